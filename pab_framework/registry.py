"""The one door to plugins: entry-point groups read through stevedore.

Built-in plugins are registered in pyproject.toml exactly like a third-party package registers
its own; nothing here imports `plugins` directly. Every plugin is checked against its kind's
contract (`pab_framework.contracts`) when it loads: one whose import fails, whose `Params` is not a
pydantic model or that lacks a required method is recorded as broken with the reason; the others
keep working.
"""
from __future__ import annotations

import difflib
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel
from stevedore import ExtensionManager

from . import contracts
from .contracts import GROUPS
from .errors import PluginError

__all__ = ["GROUPS", "Broken", "Entry", "Registry", "first_sentence", "registry", "unknown_plugin_message"]


@dataclass
class Broken:
    name: str
    group: str
    target: str
    error: str


@dataclass
class Entry:
    name: str
    group: str
    target: str  # "module:attr", for `pab plugins`
    obj: Any  # the plugin instance, as its package made it

    @cached_property
    def plugin(self) -> Any:
        """The plugin seen through its kind's contract (`pab_framework.contracts`): every hook exists."""
        return contracts.bind(self.group, self.obj, self.name)

    @property
    def Params(self) -> type[BaseModel]:
        return self.obj.Params

    @property
    def package(self) -> str:
        return self.target.split(":")[0].split(".")[0]

    @property
    def summary(self) -> str:
        """The first sentence of the plugin's docstring (what `pab plugins` shows)."""
        return first_sentence(self.obj.__doc__ or "")


# a full stop after these is not the end of a sentence
_ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "cf.", "vs.", "etc.", "approx.", "resp.", "Fig.", "Eq.", "No.")


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, its line breaks joined; the whole
    paragraph when no sentence ends in it. Never cut mid-sentence."""
    lines = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    text = " ".join(lines)
    for m in re.finditer(r"[.!?](?=\s|$)", text):
        end = m.end()
        if text[:end].endswith("..") or any(text[:end].endswith(a) for a in _ABBREVIATIONS):
            continue  # an ellipsis or an abbreviation
        return text[:end]
    return text


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[dict[str, Entry], dict[str, Broken]]] = {}

    def _load(self, group: str) -> tuple[dict[str, Entry], dict[str, Broken]]:
        with self._lock:
            if group in self._loaded:
                return self._loaded[group]
            broken: dict[str, Broken] = {}

            def on_fail(manager, ep, err):
                broken[ep.name] = Broken(ep.name, group, ep.value, f"{type(err).__name__}: {err}")

            mgr = ExtensionManager(
                namespace=group,
                invoke_on_load=False,
                on_load_failure_callback=on_fail,
            )
            entries: dict[str, Entry] = {}
            for ext in mgr.extensions:
                target = ext.entry_point.value
                try:
                    obj = ext.plugin() if isinstance(ext.plugin, type) else ext.plugin
                    problem = contracts.problem(group, obj)
                except Exception as e:  # a plugin's constructor is third-party code
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    broken[ext.name] = Broken(ext.name, group, target, problem)
                elif ext.name in entries:
                    broken[ext.name] = Broken(ext.name, group, target, f"name already registered by {entries[ext.name].target}")
                else:
                    entries[ext.name] = Entry(ext.name, group, target, obj)
            self._loaded[group] = (entries, broken)
            return self._loaded[group]

    def names(self, group: str) -> list[str]:
        return sorted(self._load(group)[0])

    def entries(self, group: str) -> dict[str, Entry]:
        return dict(self._load(group)[0])

    def broken(self, group: str) -> dict[str, Broken]:
        return dict(self._load(group)[1])

    def get(self, group: str, name: str) -> Entry:
        entries, broken = self._load(group)
        if name in entries:
            return entries[name]
        raise PluginError(unknown_plugin_message(group, name, sorted(entries), broken.get(name)))

    def get_any(self, groups: tuple[str, ...], name: str) -> Entry:
        """The plugin `name` from the first of `groups` that has it."""
        if len(groups) == 1:
            return self.get(groups[0], name)
        known: list[str] = []
        broken = None
        for g in groups:
            entries, bad = self._load(g)
            if name in entries:
                return entries[name]
            broken = broken or bad.get(name)
            known += entries
        raise PluginError(unknown_plugin_message(groups[0], name, sorted(set(known)), broken))

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()


def unknown_plugin_message(group: str, name: str, known: list[str], broken: Broken | None = None) -> str:
    kind = contracts.kind_name(group)
    if broken is not None:
        return f"{kind} plugin {name!r} is installed but broken ({broken.target}): {broken.error}"
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    msg += f" Known {kind}s: {', '.join(known) if known else '(none installed)'}"
    return msg


_registry = Registry()


def registry() -> Registry:
    return _registry
