"""Problems from validation: pydantic's errors as (key path, message) pairs with "did you mean"
hints, and each placed where its value came from (file and line, or the --set that gave it)."""
from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import Problem
from ..expand import original_path
from ..yamlio import LoadedYaml

Found = list[tuple[tuple, str]]  # (key path, message) pairs: what every check returns


def model_in(tp: Any, shape: str = "one") -> tuple[type[BaseModel], str] | None:
    """The pydantic model a field annotation holds, and how: "one", or a "list" or "dict" of
    them (through Optional, Union and `X | Y`); None when it holds none."""
    origin = get_origin(tp)
    if origin is Annotated:
        return model_in(get_args(tp)[0], shape)
    if origin is Union or origin is types.UnionType:
        for a in get_args(tp):
            if a is not type(None):
                found = model_in(a, shape)
                if found is not None:
                    return found
        return None
    if origin is list and shape == "one":
        return model_in(get_args(tp)[0], "list") if get_args(tp) else None
    if origin is dict and shape == "one":
        return model_in(get_args(tp)[-1], "dict") if get_args(tp) else None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, shape
    return None


class FieldSet:
    """The fields of several models together (the framework's and a plugin's): what may stand
    in one section, for hints."""

    def __init__(self, *models: type[BaseModel]):
        self.model_fields: dict = {}
        for m in models:
            self.model_fields.update(m.model_fields)


def _fields(cur: Any) -> dict | None:
    if isinstance(cur, FieldSet) or (isinstance(cur, type) and issubclass(cur, BaseModel)):
        return cur.model_fields
    return None


def known_keys(model: Any, loc: tuple) -> list[str] | None:
    """The keys allowed at `loc` inside `model` (a model or a FieldSet), for 'did you mean'."""
    cur: Any = model
    skip = False  # the next part is a list index or a mapping's key
    for part in loc:
        if skip or isinstance(part, int):
            skip = False
            continue
        fields = _fields(cur)
        if fields is None or part not in fields:
            return None
        found = model_in(fields[part].annotation)
        if found is None:
            return None
        cur, shape = found
        skip = shape != "one"
    fields = _fields(cur)
    return list(fields) if fields is not None else None


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _message(e: dict, loc: tuple, model: Any) -> str:
    typ = e["type"]
    if typ == "extra_forbidden":
        key = loc[-1] if loc else "?"
        msg = f"unknown key {key!r}"
        known = known_keys(model, loc[:-1]) if model is not None else None
        if known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            msg += f" Allowed here: {', '.join(known)}"
        return msg
    if typ == "missing":
        msg = "required key is missing"
        parent = e.get("input")
        if isinstance(parent, dict) and loc:
            close = difflib.get_close_matches(str(loc[-1]), [str(k) for k in parent], n=1, cutoff=0.6)
            if close:
                msg += f"; is {close[0]!r} a misspelling of {loc[-1]!r}?"
        return msg
    if typ == "pab":  # a message of ours (PydanticCustomError("pab", ...)): complete, but for the key it stands at
        return e["msg"].replace("{key}", str(loc[-1])) if loc else e["msg"]
    if typ in ("model_type", "dict_type"):
        return f"{e['msg']} (got {type(e.get('input')).__name__})"
    return e["msg"] + (f" (got {_short(e['input'])})" if "input" in e else "")


def problems_from_validation(err: ValidationError, prefix: tuple, model: Any) -> Found:
    """`err`'s errors as (key path, message) pairs, the paths below `prefix`; `model` (the
    validated model, or a FieldSet) gives the 'did you mean' hints of unknown keys."""
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and (x.startswith("function-") or x.startswith("["))))
        out.append((prefix + loc, _message(e, loc, model)))
    return out


def locate(path: tuple, message: str, source: str, loaded: LoadedYaml | None, overridden: dict, remap: dict | None = None) -> Problem:
    """A Problem at key path `path`: from the --set that set it (or a mapping above it), else the
    file's line (of the block a repeated stage was expanded from)."""
    written = original_path(path, remap) if remap else tuple(path)
    over = next((a for p, a in overridden.items() if tuple(written[: len(p)]) == p), None)
    if over is not None:
        return Problem(path, message, None, f"--set {over}")
    return Problem(path, message, loaded.line_of(written) if loaded else None, source)
