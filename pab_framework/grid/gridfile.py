"""Grid files: reading, checking and expanding one into runs (see `pab_framework.grid`; the
file's model is `pab_framework.grid.model`)."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import PabError, Problem, SpecError
from ..specification import NAME_PATTERN, ExperimentSpec, parse_override, set_path, spec_from_dict
from ..specification.load import is_grid_data, is_spec_data
from ..specification.problems import locate, problems_from_validation
from ..yamlio import LoadedYaml, load_yaml_file
from .model import GRID_KEYS, NAME_RULE, GridFile, SlurmOptions

__all__ = ["GRID_KEYS", "Grid", "GridError", "Run", "expand", "load_grid", "looks_like_grid", "short_names"]


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
        return _label(self.varied)


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
    overrides: list[str] = field(default_factory=list)  # the command line's --set, applied to every run

    @property
    def varied_keys(self) -> list[str]:
        return list(self.axes) + list(self.zipped)

    @property
    def dir(self) -> Path:
        """Where the grid's results and logs go: `<output_dir>/<grid name>/` of its first run;
        with --set, `<grid name>+<the overrides>/`, so that a grid run with other values never
        writes over the results of the grid as written (or of another --set)."""
        spec = self.runs[0].spec
        return spec.resolve_path(spec.runtime.output_dir) / (self.name + overrides_suffix(self.overrides))


def overrides_suffix(overrides: list[str]) -> str:
    """`+model.width=16` for `--set model.width=16` (several joined by `,`; a long or unusual one
    as a hash of them all): a folder name that says which values a grid's results are for."""
    if not overrides:
        return ""
    text = ",".join(o.strip() for o in overrides)
    if len(text) <= 60 and re.fullmatch(r"[A-Za-z0-9_.=,:+\-]+", text):
        return "+" + text
    return "+set-" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:10]


def _label(varied: dict[str, Any]) -> str:
    """`short=value` of every varied key, for headers and messages."""
    return " ".join(f"{short}={_show(varied[k])}" for k, short in zip(varied, short_names(list(varied))))


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


def looks_like_grid(path: str | Path) -> bool:
    """Whether `path` is a grid file (a mapping with `base:` and `grid:` or `zip:`), not a spec.
    False for anything unreadable: loading it as a spec then reports the problem."""
    try:
        data = load_yaml_file(path).data  # the spec loader's guards (size, depth, tags) apply
    except PabError:
        return False
    return is_grid_data(data)


# --------------------------------------------------------------------------- loading
def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read a grid file, expand it, and validate every run; GridError for an invalid file (every
    problem) or run (the first, naming the others), each at the file and line of the value that
    set it."""
    path = Path(path)
    loaded = load_yaml_file(path, what="grid")
    if is_spec_data(loaded.data):
        raise _grid_error([Problem((), f"this is an experiment spec (stages: and no base:), not a grid file: run it with `pab run {path}`; "
                                       f"a grid file names its base spec (base: {path.name}) and the values to vary (grid:, zip:, variants:)",
                                   None, str(path))])
    model = _read(path, loaded)
    base = Path(model.base).expanduser()
    if not base.is_absolute():
        base = path.resolve().parent / base
    if not base.is_file():
        raise _grid_error([locate(("base",), f"base spec {base} not found (the path is relative to the grid file)", str(path), loaded, {})])
    cli_set: dict[str, Any] = {}
    for a in overrides or []:
        try:
            k, v = parse_override(a)
        except SpecError as e:
            raise _grid_error(e.problems) from None
        cli_set[k] = v
    # a variant axis varies slowest; its values are the variants' names
    axes = {**{a: list(vs) for a, vs in model.variants.items()}, **model.grid}
    grid = Grid(path=path, name=model.name or path.stem, base=base, axes=axes, zipped=model.zip, fixed=model.set, slurm=model.slurm,
                overrides=list(overrides or []),
                variants=model.variants)
    _Expansion(grid, loaded, load_yaml_file(base), cli_set).runs()
    return grid


def _read(path: Path, loaded: LoadedYaml) -> GridFile:
    """The grid file's model; GridError with every problem, in the order they stand in the file."""
    try:
        model = GridFile.model_validate(loaded.data)
    except ValidationError as err:
        model, found = None, problems_from_validation(err, (), GridFile)
    else:
        found = model.cross_problems()
    problems = sorted((locate(p, msg, str(path), loaded, {}) for p, msg in found), key=lambda p: (p.line is None, p.line or 0))
    if "name" not in loaded.data and not re.match(NAME_PATTERN, path.stem):
        problems.append(Problem((), f"the grid's name comes from its file name, {path.stem!r}, which {NAME_RULE.replace('must', 'does not')}; "
                                    "set name: in the file", None, str(path)))
    if problems or model is None:
        raise _grid_error(problems)
    return model


@dataclass
class _Expansion:
    """A grid's runs: the base spec with each combination's overrides, every run validated."""

    grid: Grid
    loaded: LoadedYaml  # the grid file
    base_loaded: LoadedYaml
    cli_set: dict[str, Any]

    def settings(self, combo: dict[str, Any]) -> list[tuple[str, Any, Problem]]:
        """The overrides of one run in the order they apply (set:, its variants, --set, grid:,
        zip:), each with where it was written, for the errors of that run."""
        g, source = self.grid, str(self.grid.path)

        def at(*loc) -> Problem:
            return Problem((), "", self.loaded.line_of(loc), source)

        out = [(k, v, at("set", k)) for k, v in g.fixed.items()]
        out += [(k, v, at("variants", a, combo[a], k)) for a, named in g.variants.items() for k, v in named[combo[a]].items()]
        out += [(k, v, Problem((), "", None, f"--set {k}=...")) for k, v in self.cli_set.items()]
        for section, values in (("grid", {k: v for k, v in g.axes.items() if k not in g.variants}), ("zip", g.zipped)):
            out += [(k, combo[k], at(section, k, vals.index(combo[k]))) for k, vals in values.items()]
        return out

    def run(self, index: int, combo: dict[str, Any]) -> Run:
        """Run `index`; SpecError with its problems, each placed where the grid (or the base) set it."""
        data = copy.deepcopy(self.base_loaded.data)
        origin: dict[tuple, Problem] = {}
        try:
            for k, v, where in self.settings(combo):
                try:
                    origin[set_path(data, k, v, k)] = where
                except SpecError as e:
                    raise SpecError([Problem(p.path, p.message, where.line, where.source) for p in e.problems]) from None
            base = self.grid.base
            spec = spec_from_dict(data, source=str(base), loaded=self.base_loaded, base_dir=base.resolve().parent)
            if spec.runtime.nproc_per_node > 1:  # grid runs are single processes: never ignore it silently
                raise SpecError([spec.problem(("runtime", "nproc_per_node"), f"is {spec.runtime.nproc_per_node}, but a grid runs each run in one "
                                "process; set it to 1 for the grid (`--set runtime.nproc_per_node=1`), or run a multi-process spec with `pab run --nproc`")])
        except SpecError as e:
            raise SpecError([_placed(p, origin) for p in e.problems]) from None
        return Run(index, combo, data, spec)

    def runs(self) -> None:
        """Every run into `grid.runs`; GridError naming the first invalid run and the others."""
        combos = expand(self.grid.axes, self.grid.zipped)
        bad: list[tuple[int, list[Problem], str]] = []
        for i, combo in enumerate(combos, 1):
            try:
                self.grid.runs.append(self.run(i, combo))
            except SpecError as e:
                bad.append((i, e.problems, _label(combo)))
        if bad:
            i, problems, label = bad[0]
            title = f"invalid grid {self.grid.path}: run {i} of {len(combos)}" + (f" ({label})" if label else "")
            if len(bad) > 1:
                more = ", ".join(str(b[0]) for b in bad[1:6]) + ("..." if len(bad) > 6 else "")
                title += f" (and {len(bad) - 1} more invalid run{'s' if len(bad) > 2 else ''}: {more})"
            raise _grid_error(problems, title=title)


def _placed(p: Problem, origin: dict[tuple, Problem]) -> Problem:
    """`p` at the grid line (or --set) that set its key, or a key above it; as it is otherwise."""
    over = next((w for op, w in origin.items() if tuple(p.path[: len(op)]) == op), None)
    return Problem(p.path, p.message, over.line, over.source) if over is not None else p
