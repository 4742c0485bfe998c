"""What a plugin takes: its parameters with their types, defaults and descriptions, read from the
same JSON Schema `pab schema` prints (a spec section's framework keys, such as a pruner call's
`density`, included), for `pab plugins NAME`."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import PluginError
from .formatting import as_written
from .registry import GROUPS, Registry, first_sentence, registry as default_registry
from .schema import CALLS, spec_schema

KINDS = {group: kind for kind, group in GROUPS.items()}
BOUNDS = (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<="),
          ("minLength", "length >="), ("maxLength", "length <="), ("minItems", "items >="))


@dataclass
class Param:
    name: str
    type: str
    default: str  # as one would write it; "required" when it must be given
    description: str


@dataclass
class PluginDoc:
    kind: str
    name: str
    target: str
    summary: str
    params: list[Param] = field(default_factory=list)
    broken: str | None = None


def type_text(prop: dict, defs: dict) -> str:
    """A schema property's type in words: `float (> 0, <= 1)`, `exponential | linear`,
    `list of str`, `optimizer plugin`, `int | null`."""
    if "$ref" in prop:
        ref = prop["$ref"].rsplit("/", 1)[-1]
        target = defs.get(ref, {})
        if ref.endswith("Call"):
            return f"{ref[:-4].lower()} plugin: {{name: ..., its parameters}}"
        if "enum" in target:
            return " | ".join(as_written(v) for v in target["enum"])
        keys = ", ".join(target.get("properties", {}))
        return f"{ref} {{{keys}}}" if keys else ref
    if "enum" in prop:
        return " | ".join(as_written(v) for v in prop["enum"])
    if "const" in prop:
        return as_written(prop["const"])
    for alt in ("anyOf", "oneOf"):
        if alt in prop:
            return " | ".join(dict.fromkeys(type_text(p, defs) for p in prop[alt]))
    t = prop.get("type")
    if t == "array":
        base = f"list of {type_text(prop.get('items', {}), defs)}" if prop.get("items") else "list"
    elif t == "object":
        extra = prop.get("additionalProperties")
        base = f"mapping of str to {type_text(extra, defs)}" if isinstance(extra, dict) and extra else "mapping"
    else:
        base = {"number": "float", "integer": "int", "string": "str", "boolean": "bool", "null": "null"}.get(t, t or "any")
    bounds = [f"{sym} {as_written(prop[k])}" for k, sym in BOUNDS if k in prop]
    return base + (f" ({', '.join(bounds)})" if bounds else "")


def _params(variant: dict, defs: dict, const: str) -> list[Param]:
    required = set(variant.get("required", []))
    out = []
    for name, prop in variant.get("properties", {}).items():
        if name == const:
            continue
        default = "required" if name in required else (json.dumps(prop["default"]) if "default" in prop and isinstance(prop["default"], (dict, list))
                                                        else as_written(prop["default"]) if "default" in prop else "optional")
        out.append(Param(name, type_text(prop, defs), default, " ".join(str(prop.get("description", "")).split())))
    return out


def _variants(schema: dict) -> dict[str, tuple[str, dict[str, dict]]]:
    """Per entry-point group: (the key naming a plugin, {plugin name: its schema variant})."""
    defs = schema["$defs"]
    out: dict[str, tuple[str, dict[str, dict]]] = {}
    for call in CALLS:
        variants = {v["title"]: v for v in defs.get(call.__name__, {}).get("anyOf", []) if "title" in v}
        for group in call.groups():
            out.setdefault(group, ("name", variants))
    out["pab.stages"] = ("kind", {v["title"]: v for v in defs.get("StageSpec", {}).get("anyOf", []) if "title" in v})
    return out


def describe(name: str, reg: Registry | None = None) -> list[PluginDoc]:
    """Every installed plugin called `name`, one per kind that has one (a broken one with its
    error); a PluginError with the closest known name when there is none."""
    reg = reg or default_registry()
    found = []
    schema: dict | None = None
    for group in GROUPS.values():
        entry, bad = reg.entries(group).get(name), reg.broken(group).get(name)
        if bad is not None:
            found.append(PluginDoc(KINDS[group], name, bad.target, "", broken=bad.error))
        if entry is None:
            continue
        schema = schema or spec_schema(reg)
        defs = schema["$defs"]
        const, variants = _variants(schema).get(group, ("name", {}))
        variant = variants.get(name) or _params_schema(entry.Params, defs)
        found.append(PluginDoc(KINDS[group], name, entry.target, first_sentence(entry.obj.__doc__ or ""), _params(variant, defs, const)))
    if not found:
        known = sorted({n for g in GROUPS.values() for n in [*reg.names(g), *reg.broken(g)]})
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        raise PluginError(f"no installed plugin is called {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                          + " (`pab plugins` lists every installed plugin)")
    return found


def _params_schema(model: Any, defs: dict) -> dict:
    """A plugin kind without a spec section (an exporter): its Params' own schema."""
    s = model.model_json_schema(ref_template="#/$defs/{model}")
    defs.update(s.pop("$defs", {}))
    return s
