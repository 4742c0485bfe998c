"""The stage graph: the order stages run in (`after:` and sources) and every stage's content key."""
from __future__ import annotations

from .dag import topological_order
from .hashing import digest
from .keys import ARTIFACT_FORMAT, stage_material
from .spec import ExperimentSpec

__all__ = ["stage_keys", "stage_order", "topological_order"]


def stage_order(spec: ExperimentSpec) -> list[str]:
    """The spec's stage ids in the order they run: every stage after those it depends on, and
    otherwise in the order they are written."""
    return topological_order({sid: st.dependencies() for sid, st in spec.stages.items()})


def stage_keys(spec: ExperimentSpec, world_size: int | None = None) -> dict[str, str]:
    """Content key of every stage: what its stage kind declares its result depends on
    (`pab_framework.keys`), the artifact format, and its upstream stages' keys.

    The runtime section (device, output directory, processes) is left out unless a stage kind
    asks for its numerics (AMP, a per-rank batch's global size on `world_size` processes): it says
    where and how a result is computed, not what it is."""
    keys: dict[str, str] = {}
    for sid in stage_order(spec):
        material = {
            "format": ARTIFACT_FORMAT,
            "depends": stage_material(spec, sid, world_size),
            "upstream": {d: keys[d] for d in spec.stages[sid].dependencies()},
        }
        keys[sid] = digest(material)
    return keys
