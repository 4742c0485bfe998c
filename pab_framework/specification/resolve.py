"""Plugin resolution: every plugin section of a spec looked up in the registry and its keys
validated by the plugin's own `Params`, every problem collected on the way."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import PluginError
from ..registry import Entry, Registry
from .calls import DataCall, ModelCall, PluginSection
from .models import ExperimentSpec, RuntimeSpec, StageSpec
from .problems import FieldSet, Found, model_in, problems_from_validation


class Resolver:
    """Resolves the plugin sections of a spec and collects every problem instead of stopping at
    the first: a section that does not validate is still searched for the plugin sections inside
    it, so a misspelt pruner name is reported together with a bad density beside it."""

    def __init__(self, reg: Registry):
        self.reg = reg
        self.problems: Found = []
        self.resolved: list[tuple[Any, BaseModel, tuple]] = []  # (plugin, params, where in the spec)

    def lookup(self, section: type[PluginSection], name: str, loc: tuple) -> Entry | None:
        """The plugin `name` of `section`'s groups; None, with the problem noted at `loc`'s name key."""
        try:
            return self.reg.get_any(section.groups(), name)
        except PluginError as e:
            self.problems.append((loc + (section.name_key,), e.message))
            return None

    def spec(self, spec: ExperimentSpec) -> None:
        """Resolve every plugin section of a spec that validated."""
        self.section(spec.model, ("model",))
        self.section(spec.data, ("data",))
        for sid, st in spec.stages.items():
            self.section(st, ("stages", sid))
        self.walk(spec.runtime, ("runtime",))  # its trackers (runtime.loggers)

    def section(self, section: PluginSection, loc: tuple) -> None:
        entry = self.lookup(type(section), section.plugin_name, loc)
        if entry is None:
            return
        params = self._params(entry, section.plugin_keys(), loc, type(section))
        if params is not None:
            section.resolve(entry, params)

    def _params(self, entry: Entry, keys: dict, loc: tuple, base: type[BaseModel]) -> BaseModel | None:
        """The plugin's `Params` from `keys`, walked for nested sections; None (problems noted, and
        the sections nested in the raw keys checked anyway) when they do not validate."""
        try:
            params = entry.Params.model_validate(keys)
        except ValidationError as err:
            self.problems += problems_from_validation(err, loc, FieldSet(base, entry.Params))
            self.raw_fields(entry.Params, keys, loc)
            return None
        self.resolved.append((entry.plugin, params, loc))
        self.walk(params, loc)
        return params

    def combination_problems(self, spec: ExperimentSpec) -> Found:
        """What each plugin refuses of its combination with the rest of the spec: its hook
        `spec_problems(params, spec)`, key paths below its own section."""
        return [(loc + tuple(rel), msg) for plugin, params, loc in self.resolved for rel, msg in plugin.spec_problems(params, spec)]

    def walk(self, obj: Any, loc: tuple) -> None:
        """Resolve every plugin section nested inside a validated model."""
        if isinstance(obj, PluginSection):
            self.section(obj, loc)
        elif isinstance(obj, BaseModel):
            for fname in type(obj).model_fields:
                self.walk(getattr(obj, fname), loc + (fname,))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self.walk(v, loc + (k,))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                self.walk(v, loc + (i,))

    # ------------------------------------------------------------------ sections that did not validate
    def raw_spec(self, data: Any) -> None:
        """The plugin sections of a spec dict whose structure did not validate, checked as far as they can be."""
        if not isinstance(data, dict):
            return
        self.raw_section(ModelCall, data.get("model"), ("model",))
        self.raw_section(DataCall, data.get("data"), ("data",))
        stages = data.get("stages")
        for sid, st in (stages.items() if isinstance(stages, dict) else ()):
            self.raw_section(StageSpec, st, ("stages", sid))
        if isinstance(data.get("runtime"), dict):
            self.raw_fields(RuntimeSpec, data["runtime"], ("runtime",))

    def raw_section(self, cls: type[PluginSection], raw: Any, loc: tuple) -> None:
        raw = cls.written(raw)
        if not isinstance(raw, dict) or not isinstance(raw.get(cls.name_key), str):
            return  # not a plugin section at all: the enclosing model's validation said so
        try:
            section = cls.model_validate(raw)
        except ValidationError:  # its framework keys (density, ...): reported by the enclosing model
            section = None
        if section is not None:
            self.section(section, loc)
            return
        entry = self.lookup(cls, raw[cls.name_key], loc)
        if entry is not None:
            self._params(entry, {k: v for k, v in raw.items() if k not in cls.model_fields}, loc, cls)

    def raw_fields(self, model: type[BaseModel], raw: dict, loc: tuple) -> None:
        """The plugin sections inside the raw keys of a model that did not validate."""
        for fname, field in model.model_fields.items():
            found = model_in(field.annotation) if fname in raw else None
            if found is None:
                continue
            sub, shape = found
            value = raw[fname]
            items = (list(enumerate(value)) if shape == "list" and isinstance(value, list)
                     else list(value.items()) if shape == "dict" and isinstance(value, dict)
                     else [(None, value)] if shape == "one" else [])
            for k, v in items:
                where = loc + (fname,) + (() if k is None else (k,))
                if issubclass(sub, PluginSection):
                    self.raw_section(sub, v, where)
                elif isinstance(v, dict):
                    self.raw_fields(sub, v, where)
