"""JSON Schema of the spec with every installed plugin's parameters, for editors."""
from __future__ import annotations

from typing import Any

from .registry import Registry, registry as default_registry
from .specification import (DataCall, ExperimentSpec, LoggerCall, ModelCall, OptimizerCall, PluginCall, PrunerCall, QuantizerCall, StageSpec,
                            TransformCall)

CALLS: list[type[PluginCall]] = [ModelCall, DataCall, PrunerCall, OptimizerCall, QuantizerCall, TransformCall, LoggerCall]
REF = "#/$defs/{model}"


def _params_schema(model, defs: dict) -> dict:
    s = model.model_json_schema(ref_template=REF)
    for k, v in s.pop("$defs", {}).items():
        if k not in {c.__name__ for c in CALLS} | {"StageSpec"}:
            defs.setdefault(k, v)
    return s


def _variant(const_key: str, const: str, doc: str | None, own: dict, plugin: dict) -> dict:
    props = {**own.get("properties", {}), **plugin.get("properties", {})}
    props[const_key] = {"const": const, "description": (doc or "").strip().splitlines()[0] if doc else const}
    required = sorted(set(own.get("required", [])) | set(plugin.get("required", [])) | {const_key})
    return {"type": "object", "title": const, "properties": props, "required": required, "additionalProperties": False,
            "if": {"properties": {const_key: {"const": const}}}}


def spec_schema(reg: Registry | None = None) -> dict[str, Any]:
    reg = reg or default_registry()
    schema = ExperimentSpec.model_json_schema(ref_template=REF)
    defs = schema.setdefault("$defs", {})
    for call in CALLS:
        own = call.model_json_schema(ref_template=REF)
        own.get("properties", {}).pop("name", None)
        variants = []
        names: list[str] = []
        for group in call.groups():
            for name, entry in reg.entries(group).items():
                if name not in names:
                    names.append(name)
                    variants.append(_variant("name", name, entry.obj.__doc__, own, _params_schema(entry.Params, defs)))
        section = {"type": "object", "required": ["name"], "properties": {"name": {"enum": sorted(names)}},
                   "anyOf": variants or [{"type": "object"}]}
        if call.bare_name:  # the plugin's name alone stands for it too
            section = {"anyOf": [{"enum": sorted(names)}, section]}
        defs[call.__name__] = {"title": call.__name__, "description": f"A plugin from the {' or '.join(call.groups())} entry-point group.", **section}
    own = StageSpec.model_json_schema(ref_template=REF)
    own.get("properties", {}).pop("kind", None)
    variants = [_variant("kind", name, entry.obj.__doc__, own, _params_schema(entry.Params, defs)) for name, entry in reg.entries("pab.stages").items()]
    defs["StageSpec"] = {"title": "StageSpec", "type": "object", "required": ["kind"],
                         "properties": {"kind": {"enum": sorted(reg.names("pab.stages"))}}, "anyOf": variants}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pab experiment spec"
    return schema
