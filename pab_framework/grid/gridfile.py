"""Grid files: reading, checking and expanding one into runs (see `pab_framework.grid`)."""
from __future__ import annotations

import copy
import difflib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import PabError, Problem, SpecError
from ..spec import NAME_PATTERN, ExperimentSpec, parse_override, problems_from_validation, set_path, spec_from_dict
from ..yamlio import LoadedYaml, load_yaml_file
from .slurm import SlurmOptions

GRID_KEYS = ("base", "name", "variants", "grid", "zip", "set", "slurm")
AXIS_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class GridError(SpecError):
    """A grid file that does not validate, or a run of it that does not."""


def _grid_error(problems: list[Problem], title: str = "invalid grid") -> GridError:
    return GridError(problems, title=title)


# --------------------------------------------------------------------------- the grid
@dataclass
class Run:
    index: int  # 1-based, in expansion order
    varied: dict[str, Any]  # grid and zip key -> this run's value
    data: dict  # the run's spec as a dict (base + set + varied)
    spec: ExperimentSpec

    def label(self) -> str:
        return " ".join(f"{short}={_show(self.varied[k])}" for k, short in zip(self.varied, short_names(list(self.varied))))


@dataclass
class Grid:
    path: Path
    name: str
    base: Path
    axes: dict[str, list]
    zipped: dict[str, list]
    fixed: dict[str, Any]
    slurm: SlurmOptions
    runs: list[Run] = field(default_factory=list)
    variants: dict[str, dict[str, dict]] = field(default_factory=dict)  # axis -> variant name -> overrides

    @property
    def varied_keys(self) -> list[str]:
        return list(self.axes) + list(self.zipped)

    @property
    def dir(self) -> Path:
        """Where the grid's results and logs go: `<output_dir>/<grid name>/` of its first run."""
        spec = self.runs[0].spec
        return spec.resolve_path(spec.runtime.output_dir) / self.name


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


RESULT_COLUMNS = ("run", "status", "val_acc", "density", "time_s", "time", "seeds", "ok")


def short_names(keys: list[str]) -> list[str]:
    """The shortest unambiguous dotted suffix of every key (`pruner.density`, `seed`), for headers;
    never a bare `name` nor the name of a results column."""
    out = []
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            clash = any(o != k and o.split(".")[-n:] == parts[-n:] for o in keys)
            generic = n == 1 and len(parts) > 1 and parts[-1] in ("name", "kind", "value", *RESULT_COLUMNS)
            if not clash and not generic:
                break
        out.append(cand)
    return out


def expand(axes: dict[str, list], zipped: dict[str, list] | None = None) -> list[dict[str, Any]]:
    """Every combination: the cartesian product of `axes` (first key slowest) times the `zipped`
    lists taken together (they must have equal lengths)."""
    zipped = zipped or {}
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("zip lists must have equal lengths: " + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
    for k, v in list(axes.items()) + list(zipped.items()):
        if not isinstance(v, list) or not v:
            raise ValueError(f"{k}: needs a non-empty list of values")
    zip_rows = [dict(zip(zipped, vals)) for vals in zip(*zipped.values())] if zipped else [{}]
    combos = []
    for vals in itertools.product(*axes.values()):
        for z in zip_rows:
            combos.append({**dict(zip(axes, vals)), **z})
    return combos


def _check_section(loaded: LoadedYaml, section: str, source: str, lists: bool) -> tuple[dict, list[Problem]]:
    raw = loaded.data.get(section)
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [Problem((section,), f"must be a mapping of key paths to {'lists of values' if lists else 'values'} (got {type(raw).__name__})", loaded.line_of((section,)), source)]
    problems = []
    out = {}
    for k, v in raw.items():
        line = loaded.line_of((section, k))
        if not isinstance(k, str) or not KEY_PATTERN.match(k):
            problems.append(Problem((section, k), "a key path looks like stages.prune.pruner.density (names and list indices joined by dots)", line, source))
            continue
        if lists:
            if isinstance(v, dict):
                problems.append(Problem((section, k), f"needs a list of values, found a mapping; write the full key path with dots (e.g. {k}.{next(iter(v), 'key')}: [...])", line, source))
                continue
            if not isinstance(v, list) or not v:
                problems.append(Problem((section, k), f"needs a non-empty list of values (got {v!r}); a value for every run belongs in set:", line, source))
                continue
        out[k] = v
    return out, problems


def _check_variants(loaded: LoadedYaml, source: str) -> tuple[dict, list[Problem]]:
    """`variants:` maps an axis name (a results column, e.g. `method`) to named variants, each a
    mapping of key paths to values (as `set:`) applied to the runs of that variant: different
    methods, with different stage graphs, in one grid."""
    raw = loaded.data.get("variants")
    if raw is None:
        return {}, []
    line = loaded.line_of
    if not isinstance(raw, dict) or not raw:
        return {}, [Problem(("variants",), "must map an axis name (e.g. method) to named variants", line(("variants",)), source)]
    out: dict[str, dict[str, dict]] = {}
    problems = []
    for axis, named in raw.items():
        loc = ("variants", axis)
        if not isinstance(axis, str) or not AXIS_PATTERN.match(axis):
            problems.append(Problem(loc, f"axis name {axis!r} must be a word (letters, digits, '_', '-'): it names a results column", line(loc), source))
            continue
        if not isinstance(named, dict) or not named:
            problems.append(Problem(loc, "needs named variants: {name: {key.path: value, ...}, ...}", line(loc), source))
            continue
        out[axis] = {}
        for vname, sets in named.items():
            vloc = loc + (vname,)
            if not isinstance(vname, str) or not re.match(NAME_PATTERN, vname):
                problems.append(Problem(vloc, f"variant name {vname!r} must be letters, digits, '_', '.', '-'", line(vloc), source))
                continue
            if sets is None:
                sets = {}
            if not isinstance(sets, dict):
                problems.append(Problem(vloc, "must be a mapping of key paths to values (as set:)", line(vloc), source))
                continue
            bad = [k for k in sets if not isinstance(k, str) or not KEY_PATTERN.match(k)]
            for k in bad:
                problems.append(Problem(vloc + (k,), "a key path looks like stages.prune.pruner.density", line(vloc + (k,)), source))
            out[axis][vname] = {k: v for k, v in sets.items() if k not in bad}
    return out, problems


def looks_like_grid(path: str | Path) -> bool:
    """Whether `path` is a grid file (a mapping with `base:` and `grid:` or `zip:`), not a spec.
    False for anything unreadable: loading it as a spec then reports the problem."""
    try:
        data = load_yaml_file(path).data  # the spec loader's guards (size, depth, tags) apply
    except PabError:
        return False
    return isinstance(data, dict) and "base" in data and ("grid" in data or "zip" in data or "variants" in data)


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read a grid file, expand it, and validate every run; the first invalid run stops it
    (GridError naming the run and the key, with the file and line of the value that set it)."""
    path = Path(path)
    source = str(path)
    loaded = load_yaml_file(path, what="grid")
    data = loaded.data
    problems: list[Problem] = []
    for k in data:
        if k not in GRID_KEYS:
            close = difflib.get_close_matches(str(k), GRID_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(Problem((k,), f"unknown key {k!r}{hint} Allowed here: {', '.join(GRID_KEYS)}", loaded.line_of((k,)), source))
    base_raw = data.get("base")
    if not isinstance(base_raw, str) or not base_raw.strip():
        problems.append(Problem(("base",), "required: the path of the base spec (relative to this file)", loaded.line_of(("base",)), source))
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        why = "must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
        if "name" in data:
            problems.append(Problem(("name",), f"grid name {name!r} {why}", loaded.line_of(("name",)), source))
        else:
            problems.append(Problem((), f"the grid's name comes from its file name, {name!r}, which {why.replace('must', 'does not')}; set name: in the file", None, source))
    variants, p0 = _check_variants(loaded, source)
    problems += p0
    axes, p1 = _check_section(loaded, "grid", source, lists=True)
    zipped, p2 = _check_section(loaded, "zip", source, lists=True)
    fixed, p3 = _check_section(loaded, "set", source, lists=False)
    problems += p1 + p2 + p3
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(zipped))
        for k, n in lengths.items():
            if n != lengths[first]:
                problems.append(Problem(("zip", k), f"zip lists must have equal lengths: {k} has {n} values, {first} has {lengths[first]}", loaded.line_of(("zip", k)), source))
    seen: dict[str, str] = {}
    for section, keys in (("variants", variants), ("grid", axes), ("zip", zipped), ("set", fixed)):
        for k in keys:
            if k in seen:
                problems.append(Problem((section, k), f"{k} is set in both {seen[k]}: and {section}:", loaded.line_of((section, k)), source))
            seen.setdefault(k, section)
    slurm_raw = data.get("slurm") or {}
    slurm = SlurmOptions()
    if not isinstance(slurm_raw, dict):
        problems.append(Problem(("slurm",), "must be a mapping (partition, time, gpus_per_node, cpus_per_task, ...)", loaded.line_of(("slurm",)), source))
    else:
        try:
            slurm = SlurmOptions.model_validate(slurm_raw)
        except ValidationError as err:
            for p, msg in problems_from_validation(err, ("slurm",), SlurmOptions):
                problems.append(Problem(p, msg, loaded.line_of(p), source))
    if problems:
        raise _grid_error(problems)

    base = Path(base_raw).expanduser()
    if not base.is_absolute():
        base = path.resolve().parent / base
    if not base.is_file():
        raise _grid_error([Problem(("base",), f"base spec {base} not found (the path is relative to the grid file)", loaded.line_of(("base",)), source)])
    base_loaded = load_yaml_file(base)

    # where each override came from, for errors: (grid section, key) or the --set text
    cli_set: dict[str, Any] = {}
    for a in overrides or []:
        try:
            k, v = parse_override(a)
        except SpecError as e:
            raise _grid_error(e.problems) from None
        cli_set[k] = v

    # a variant axis varies slowest; its values are the variants' names
    all_axes = {**{a: list(vs) for a, vs in variants.items()}, **axes}
    grid = Grid(path=path, name=name, base=base, axes=all_axes, zipped=zipped, fixed=fixed, slurm=slurm, variants=variants)
    combos = expand(all_axes, zipped)
    bad: list[tuple[Run | int, GridError]] = []
    for i, combo in enumerate(combos, 1):
        run_data = copy.deepcopy(base_loaded.data)
        origin: dict[tuple, Problem] = {}
        try:
            chosen = [(a, combo[a]) for a in variants]
            for section, items in (("set", fixed), *((("variants", a, vname), variants[a][vname]) for a, vname in chosen),
                                   ("--set", cli_set), ("grid", {k: v for k, v in combo.items() if k in axes}),
                                   ("zip", {k: v for k, v in combo.items() if k in zipped})):
                for k, v in items.items():
                    if section == "--set":
                        where = Problem((), "", None, f"--set {k}=...")
                    elif isinstance(section, tuple):  # a variant's override
                        where = Problem((), "", loaded.line_of((*section, k)), source)
                    else:
                        vals = axes.get(k) if section == "grid" else zipped.get(k) if section == "zip" else None
                        idx = vals.index(v) if vals is not None else None
                        loc = (section, k) if idx is None else (section, k, idx)
                        where = Problem((), "", loaded.line_of(loc), source)
                    try:
                        origin[set_path(run_data, k, v, k)] = where
                    except SpecError as e:
                        raise _grid_error([Problem(p.path, p.message, where.line, where.source) for p in e.problems]) from None
            spec = spec_from_dict(run_data, source=str(base), loaded=base_loaded, base_dir=base.resolve().parent)
            if spec.runtime.nproc_per_node > 1:  # grid runs are single processes: never ignore it silently
                path_ = ("runtime", "nproc_per_node")
                raise SpecError([Problem(path_, f"is {spec.runtime.nproc_per_node}, but a grid runs each run in one process; set it to 1 "
                                         "for the grid (`--set runtime.nproc_per_node=1`), or run a multi-process spec with `pab run --nproc`",
                                         base_loaded.line_of(path_), str(base))])
        except SpecError as e:
            probs = []
            for p in e.problems:
                over = next((w for op, w in origin.items() if tuple(p.path[: len(op)]) == op), None)
                probs.append(Problem(p.path, p.message, over.line, over.source) if over is not None else p)
            label = " ".join(f"{s}={_show(combo[k])}" for k, s in zip(combo, short_names(list(combo))))
            bad.append((i, _grid_error(probs, title=f"invalid grid {source}: run {i} of {len(combos)}" + (f" ({label})" if label else ""))))
            continue
        grid.runs.append(Run(i, combo, run_data, spec))
    if bad:
        first = bad[0][1]
        if len(bad) > 1:
            first.title += f" (and {len(bad) - 1} more invalid run{'s' if len(bad) > 2 else ''}: {', '.join(str(b[0]) for b in bad[1:6])}{'...' if len(bad) > 6 else ''})"
            first.message = first.render()
            first.args = (first.message,)
        raise first
    return grid


