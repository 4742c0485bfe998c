"""Whose code failed inside a stage: pab's own, or a third-party plugin's.

An exception a stage raises is attributed by its traceback: the innermost frame that belongs to
pab (pab_framework, or a package whose plugins pab's own distribution registers) or to an
installed third-party plugin's package decides. Frames of torch, numpy or the standard library
belong to nobody here and are passed over. A failure in a third-party plugin becomes one
paragraph naming the plugin (kind, name, where it comes from), the stage, and the line that
raised, exit code 2 (`--debug` adds the traceback); a failure in pab itself keeps its traceback:
it is a bug to report.
"""
from __future__ import annotations

import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .errors import PluginError
from .registry import GROUPS, Entry, Registry, registry as default_registry

KINDS = {group: kind for kind, group in GROUPS.items()}


class PluginFailure(PluginError):
    """A third-party plugin's code raised during a stage."""


def own_packages() -> set[str]:
    """The top-level packages that are pab itself: pab_framework and the packages of the plugins
    pab's own distribution registers."""
    own = {__name__.split(".")[0]}
    try:
        eps = metadata.distribution("pab").entry_points
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return own
    return own | {ep.value.split(":")[0].split(".")[0] for ep in eps if ep.group in KINDS}


def third_party(reg: Registry, own: set[str]) -> dict[str, list[Entry]]:
    """Installed plugins from packages other than pab's, by top-level package."""
    out: dict[str, list[Entry]] = {}
    for group in GROUPS.values():
        for e in reg.entries(group).values():
            if e.package not in own:
                out.setdefault(e.package, []).append(e)
    return out


def _names(obj: Any) -> Iterable[str]:
    """Every plugin name in a resolved spec section (the `name` of each mapping in it, nested)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("name"), str):
            yield obj["name"]
        for v in obj.values():
            yield from _names(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _names(v)


def _pick(entries: list[Entry], module: str, used: set[str]) -> Entry:
    """The plugin a frame of `module` belongs to: one the stage uses, defined in that module if
    one is; else one the stage uses; else the first of its package."""
    def score(e: Entry) -> tuple[bool, bool]:
        return (e.name in used, e.target.split(":")[0] == module)

    return max(entries, key=score)


def culprit(exc: BaseException, used: set[str], reg: Registry | None = None) -> tuple[Entry, Any, int] | None:
    """(plugin entry, frame, line) of the third-party plugin whose code raised `exc`, or None when
    the innermost frame that is pab's or a plugin's is pab's own (or there is none)."""
    own = own_packages()
    theirs = third_party(reg or default_registry(), own)
    for frame, lineno in reversed(list(traceback.walk_tb(exc.__traceback__))):
        module = str(frame.f_globals.get("__name__", ""))
        top = module.split(".")[0]
        if top in own:
            return None
        if top in theirs:
            return _pick(theirs[top], module, used), frame, lineno
    return None


def plugin_failure(exc: Exception, stage_id: str, stage_kind: str, spec: dict, reg: Registry | None = None) -> PluginFailure | None:
    """A PluginFailure naming the plugin, the stage and the line, when a third-party plugin's code
    raised `exc` during stage `stage_id` of the resolved spec `spec`; None for pab's own failures."""
    used = {stage_kind, *_names((spec.get("stages") or {}).get(stage_id)), *_names(spec.get("model")), *_names(spec.get("data"))}
    found = culprit(exc, used, reg)
    if found is None:
        return None
    entry, frame, lineno = found
    what = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    where = f"{frame.f_globals.get('__name__')} ({Path(frame.f_code.co_filename).name}:{lineno}, in {frame.f_code.co_name})"
    return PluginFailure(
        f"stage {stage_id} ({stage_kind}): the {KINDS.get(entry.group, entry.group)} plugin {entry.name!r} ({entry.target}) failed with "
        f"{type(exc).__name__}{': ' + what if what else ''}, raised in {where}. The error is in that plugin's code, not in pab: "
        f"check its parameters and its version, or report it to its authors (add --debug for the traceback)."
    )
