"""What a stage's content key is made of.

Every stage kind declares what its result depends on with its hook `key(view) -> dict`, built
from a `KeyView` of the spec; the engine adds the upstream stages' keys and the artifact format,
and hashes the lot. A stage kind without its own `key()` depends on everything
(`view.default()`, see `pab_framework.contracts.StagePlugin`).

A parameter whose value cannot change a result (how often to checkpoint; two implementations
that compute bitwise alike; a documented no-op kept for fidelity) is marked where it is declared,
`Field(..., json_schema_extra={"key": False})`, and left out of every key: changing it reuses
what was computed. An option added after results exist is marked `{"key": "if_set"}`: it enters
the key only when set to something other than its default, so the stages computed before it
existed keep their keys.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from .hashing import file_digest
from .spec import ExperimentSpec, PluginCall, Source

# Bump when the meaning of a stage's artifacts changes, so old caches are not reused.
ARTIFACT_FORMAT = 2


def in_key(field, value: Any = None) -> bool:
    """Whether a field's value belongs in keys: not when it is marked `"key": False`, nor while
    it holds its default when marked `"key": "if_set"` (an option added later: the results
    computed before it existed are the ones its default gives, and stay reused)."""
    extra = field.json_schema_extra
    mark = extra.get("key") if isinstance(extra, dict) else None
    if mark is False:
        return False
    if mark == "if_set":
        return value != field.get_default(call_default_factory=True)
    return True


def key_dump(obj: Any) -> Any:
    """`obj` (a validated spec section) as JSON-able data, without the parameters marked out of keys."""
    if isinstance(obj, PluginCall):
        out: dict[str, Any] = {"name": obj.name}
        for fname, f in type(obj).model_fields.items():
            if fname != "name" and in_key(f, getattr(obj, fname)):
                out[fname] = key_dump(getattr(obj, fname))
        if obj.resolved:
            out.update(key_dump(obj.params))
        else:
            out.update(to_jsonable_python(obj.plugin_keys()))
        return out
    if isinstance(obj, BaseModel):
        return {fname: key_dump(getattr(obj, fname)) for fname, f in type(obj).model_fields.items() if in_key(f, getattr(obj, fname))}
    if isinstance(obj, dict):
        return {str(k): key_dump(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [key_dump(v) for v in obj]
    return to_jsonable_python(obj)


def runtime_numerics(spec: ExperimentSpec, world_size: int | None = None) -> dict:
    """The part of `runtime` that changes what a training stage computes: mixed precision, and
    the global batch when `batch_size_is: per_rank` runs on several processes. Empty in the
    default setting (full precision; `global` batches mean the same on any number of processes)."""
    rt = spec.runtime
    w = world_size or rt.nproc_per_node
    out: dict = {}
    if rt.amp != "none":
        out["amp"] = rt.amp
    if rt.batch_size_is == "per_rank" and w > 1:
        out["global_batch_size"] = spec.data.batch_size * w
    return out


class KeyView:
    """The parts of a spec a stage kind's `key(view)` chooses from."""

    def __init__(self, spec: ExperimentSpec, stage_id: str, world_size: int | None = None):
        self.spec = spec
        self.stage_id = stage_id
        self.world_size = world_size

    @property
    def seed(self) -> int:
        return self.spec.seed

    def stage(self) -> dict:
        """This stage's kind, parameters and sources (which upstream stages' keys, covered by the
        upstream keys, and which file or epoch its masks and weights come from)."""
        st = self.spec.stages[self.stage_id]
        out = {"kind": st.kind, **(key_dump(st.params) if st.resolved else {})}
        for k in ("masks_from", "weights_from"):
            src = getattr(st, k)
            if src is not None:
                out[k] = key_dump(src)
                if isinstance(src, Source) and src.path:  # a file: what it holds
                    out[k]["sha256"] = file_digest(self.spec.resolve_path(src.path))
        return out

    def model(self) -> dict:
        return key_dump(self.spec.model)

    def data(self, *, train_batch: bool = True, eval_batch: bool = True) -> dict:
        """The data section. `train_batch=False` leaves out `batch_size`, `eval_batch=False` the
        evaluation batch size; when kept, the evaluation batch size is the one in effect
        (`eval_batch_size`, else `batch_size`)."""
        d = key_dump(self.spec.data)
        eff = self.spec.data.eval_batch_size or self.spec.data.batch_size
        d.pop("batch_size", None)
        d.pop("eval_batch_size", None)
        if train_batch:
            d["batch_size"] = self.spec.data.batch_size
        if eval_batch:
            d["eval_batch_size"] = eff
        return d

    def runtime(self) -> dict:
        return runtime_numerics(self.spec, self.world_size)

    def default(self, *, runtime: bool = False, **data: bool) -> dict:
        """Everything a stage may read: its parameters, the model, the data (`data` as `data()`'s
        options), the seed; with `runtime`, the numerics of runtime (AMP, a per-rank batch)."""
        out = {"stage": self.stage(), "model": self.model(), "data": self.data(**data), "seed": self.seed}
        if runtime:
            rt = self.runtime()
            if rt:
                out["runtime"] = rt
        return out


def stage_material(spec: ExperimentSpec, stage_id: str, world_size: int | None = None) -> dict:
    """What the stage kind declares its result depends on (see the module docstring)."""
    return spec.stages[stage_id].plugin.key(KeyView(spec, stage_id, world_size))
