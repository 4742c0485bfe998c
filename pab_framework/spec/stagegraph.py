"""Checks of the stage graph: every stage a stage names exists, no stage depends on itself, no
cycle, and a stage rewound to an epoch's weights (`weights_from: {stage, epoch}`) has them."""
from __future__ import annotations

import difflib
from typing import Any

from ..dag import find_cycle
from .models import ExperimentSpec
from .problems import Found


def check_refs(refs: dict) -> Found:
    """Stage references (`refs`: stage id -> [(key path, stage it names)]) to stages that are not
    in the spec, or to the stage itself."""
    problems = []
    ids = list(refs)
    for sid, deps in refs.items():
        for loc, dep in deps:
            if dep not in refs:
                close = difflib.get_close_matches(dep, ids, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                what = "runs after" if loc[2] == "after" else f"takes its {loc[2].split('_')[0]} from"
                problems.append((loc, f"stage {sid!r} {what} {dep!r}, which is not a stage of this spec{hint} Stages: {', '.join(ids)}"))
            elif dep == sid:
                problems.append((loc, f"stage {sid!r} cannot depend on itself"))
    return problems


def check_graph(spec: ExperimentSpec) -> Found:
    """The graph of a spec that validated: references, rewinding points, cycles."""
    refs = {}
    for sid, st in spec.stages.items():
        refs[sid] = [(("stages", sid, "after", i), dep) for i, dep in enumerate(st.after)]
        refs[sid] += [(("stages", sid, key, "stage"), src.stage) for key, src in st.sources().items() if src.stage is not None]
    problems = check_refs(refs)
    if problems:
        return problems
    problems += check_kept_weights(spec)
    cycle = find_cycle({sid: st.dependencies() for sid, st in spec.stages.items()})
    if cycle:
        problems.append((("stages", cycle[0], "after"), "the stages form a cycle: " + " -> ".join(cycle + [cycle[0]])))
    return problems


def raw_graph(data: Any) -> Found:
    """`after:` references of a spec dict whose structure did not validate, where they can be read."""
    raw = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        return []
    after = {sid: (st.get("after") or []) if isinstance(st, dict) else [] for sid, st in raw.items()}
    if not all(isinstance(sid, str) and isinstance(a, list) and all(isinstance(x, str) for x in a) for sid, a in after.items()):
        return []  # a graph that does not parse: its structure problems say why
    return check_refs({sid: [(("stages", sid, "after", i), dep) for i, dep in enumerate(a)] for sid, a in after.items()})


def check_kept_weights(spec: ExperimentSpec) -> Found:
    """Rewinding (`weights_from: {stage, epoch}`) needs that stage to keep the weights of that
    epoch: its kind's hook `kept_epochs(params)` says which it keeps."""
    problems = []
    for sid, st in spec.stages.items():
        src = st.sources().get("weights_from")
        if src is None or src.epoch is None or src.stage not in spec.stages:
            continue
        up = spec.stages[src.stage]
        if not up.resolved:  # its own section is invalid: reported already
            continue
        kept = up.plugin.kept_epochs(up.params)
        loc = ("stages", sid, "weights_from", "epoch")
        if kept is None:
            problems.append((loc, f"stage {src.stage!r} ({up.kind}) keeps no weights per epoch: rewinding needs a stage whose kind keeps them"))
        elif src.epoch not in kept:
            problems.append((loc, f"stage {src.stage!r} keeps no weights after epoch {src.epoch}, only after epochs {list(kept)}: "
                                  f"have stages.{src.stage} keep epoch {src.epoch} as well"))
    return problems
