"""Loading a spec: the YAML file, `--set` overrides, shorthands expanded, then validated completely
(structure, every plugin's parameters, the stage graph, files it names), every problem at once."""
from __future__ import annotations

import copy
from pathlib import Path

from pydantic import ValidationError

from ..errors import Problem, SpecError
from ..expand import expand
from ..registry import Registry, registry as default_registry
from ..yamlio import LoadedYaml, load_yaml_file
from .finite import finite_problems, without_nonfinite
from .models import ExperimentSpec
from .overrides import apply_override, explain, missing_prefix, parse_override
from .problems import Found, locate, problems_from_validation
from .resolve import Resolver
from .sources import check_source_files
from .stagegraph import check_graph, raw_graph


def _validate(data: dict, reg: Registry) -> tuple[ExperimentSpec | None, Found]:
    """The spec of `data` and the problems found in one go: non-finite numbers, the structure,
    every plugin section, the graph; then, once all of that holds, the plugins' own checks of
    their combination with the rest."""
    bad = finite_problems(data)
    if bad:  # each named once; the flagged values are left out of what is validated next
        data = without_nonfinite(data)
    res = Resolver(reg)
    spec: ExperimentSpec | None = None
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as err:
        structure = problems_from_validation(err, (), ExperimentSpec)
        res.raw_spec(data)
        graph = raw_graph(data)
    else:
        structure = []
        res.spec(spec)
        graph = check_graph(spec)
    flagged = {p for p, _ in bad}
    problems = list(dict.fromkeys(bad + [(p, m) for p, m in structure + res.problems + graph if p not in flagged]))
    if not problems and spec is not None:
        problems = res.combination_problems(spec)
    return spec, problems


def spec_from_dict(
    data: dict,
    *,
    source: str = "<spec>",
    loaded: LoadedYaml | None = None,
    overridden: dict[tuple, str] | None = None,
    base_dir: Path | None = None,
    reg: Registry | None = None,
    created: dict[tuple, str] | None = None,
) -> ExperimentSpec:
    """Validate a spec dict completely (structure, every plugin's parameters, the stage graph);
    SpecError with every problem, each at its file and line (or --set). `overridden`: key path ->
    the --set that set it; `created`: the mappings a --set created (said as typos when close to
    an existing key)."""
    overridden = dict(overridden or {})
    created = created or {}
    data, remap, problems = expand(data)  # vars: and repeated stage blocks
    spec = None
    if not problems:
        spec, problems = _validate(data, reg or default_registry())
    if not problems and spec is not None:
        spec.place(source, loaded, overridden, remap, base_dir)
        problems = check_source_files(spec)
    if problems or spec is None:
        problems = explain(problems, data, overridden, created)
        overridden.update(created)  # what lies under a mapping a --set created comes from that --set
        found = [locate(path, msg, source, loaded, overridden, remap) for path, msg in problems]
        found.sort(key=lambda p: (p.line is None, p.line or 0))  # in the order they stand in the file
        raise SpecError(found)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None, reg: Registry | None = None) -> ExperimentSpec:
    """The spec in the YAML file `path`, with `--set` overrides (`key.path=value`) applied."""
    path = Path(path)
    loaded = load_yaml_file(path)
    data = copy.deepcopy(loaded.data)
    if is_grid_data(data):
        raise SpecError([Problem((), f"this is a grid file (base: with grid:, zip: or variants:), not an experiment spec: run its runs "
                                     f"with `pab grid {path}` (`pab validate {path}` checks them all)", None, str(path))])
    overridden: dict[tuple, str] = {}
    created: dict[tuple, str] = {}
    for a in overrides or []:
        new = missing_prefix(data, parse_override(a)[0])
        path_set = apply_override(data, a)
        overridden[path_set] = a
        if new is not None and new != path_set:
            created[new] = a
    return spec_from_dict(data, source=str(path), loaded=loaded, overridden=overridden, base_dir=path.resolve().parent, reg=reg,
                          created=created)


def is_grid_data(data) -> bool:
    """Whether a YAML document is a grid file (a mapping with `base:` and what it varies), not a spec."""
    return isinstance(data, dict) and "base" in data and any(k in data for k in ("grid", "zip", "variants"))


def is_spec_data(data) -> bool:
    """Whether a YAML document is an experiment spec (a mapping with `stages:` and no `base:`)."""
    return isinstance(data, dict) and "stages" in data and "base" not in data
