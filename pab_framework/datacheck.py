"""Missing data, found before any stage runs.

A dataset plugin may have a `check(params, splits, *, base_dir)` hook that raises
`DataError(message, key=...)` when the data of the given splits is not where its parameters say
(`key` names the parameter at fault, `root` say). `pab validate`, `pab run` and `pab grid` call it
for the stages that will run, before the first one starts, so a missing CIFAR folder is a message
naming the spec's file, line and `data.root` rather than an error after minutes of pruning.

A stage that is complete is reused and reads no data: a run whose stages are all complete works
without its data (a results directory copied to a laptop, say). A stage kind may say which splits
it reads with `data_splits(params)`; one that does not is assumed to read `train` and `val`
(the hooks and their defaults: `pab_framework.contracts`).
"""
from __future__ import annotations

from typing import Iterable

from .errors import DataError, Problem, SpecError

def stage_splits(spec, stage_id: str) -> tuple[str, ...]:
    """The splits stage `stage_id` of `spec` reads when it runs."""
    st = spec.stages[stage_id]
    return tuple(st.plugin.data_splits(st.params))


def problems(spec, stage_ids: Iterable[str], name_stages: bool = True) -> list[Problem]:
    """What is missing of the data the stages `stage_ids` of `spec` will read (empty: nothing, or
    no stage to run, or a dataset plugin without `check`). Every stage builds its model, and so
    asks the dataset for its `info()`: the check runs even when no stage reads a split."""
    ids = list(stage_ids)
    call = spec.data
    if not ids:
        return []
    readers: dict[str, list[str]] = {}
    for sid in ids:
        for split in stage_splits(spec, sid):
            readers.setdefault(split, []).append(sid)
    try:
        call.plugin.check(call.params, tuple(readers), base_dir=spec.base_dir)
    except DataError as e:
        who = sorted({s for sids in readers.values() for s in sids}, key=ids.index) or ids
        what = f" (stage{'s' if len(who) > 1 else ''} {', '.join(who)} will read it)" if name_stages else ""
        return [spec.problem(("data",) + ((e.key,) if e.key else ()), e.message + what)]
    return []


def check_data(spec, stage_ids: Iterable[str]) -> None:
    """Raise SpecError ("missing data: FILE:LINE, data.root: ...", exit 2) when `problems()` finds any."""
    found = problems(spec, stage_ids)
    if found:
        raise SpecError(found, title="missing data")
