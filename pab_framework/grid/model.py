"""The grid file as written: a pydantic model, like the spec, whose errors go through the spec's
own code (`problems_from_validation`, `locate`: file, line and key path, "did you mean"), and
the checks across its sections."""
from __future__ import annotations

import re
from typing import Annotated, Any, Callable, Optional, Union

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ..errors import PabError
from ..spec import NAME_PATTERN, StrictModel
from ..spec.problems import Found

AXIS_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
KEY_PATH = "a key path looks like stages.prune.pruner.density (names and list indices joined by dots)"
NAME_RULE = "must start with a letter or digit and hold only letters, digits, '_', '.', '-'"


def _error(message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError("pab", message, context or None)  # "pab": a message complete as it stands


def _section(what: str, empty: str | None = None) -> BeforeValidator:
    """A section that maps keys to values: None is empty; anything but a mapping is an error that
    says `what` it must be; `empty`: the error of an empty mapping, where one is wrong."""

    def check(raw: Any) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _error(f"{what} (got {type(raw).__name__})")
        if empty and not raw:
            raise _error(empty)
        return raw

    return BeforeValidator(check)


def _checked(ok: Callable[[Any], bool], message: str) -> BeforeValidator:
    """A key or value that must pass `ok`; `message` (with `{value}`, its repr) when it does not."""

    def check(v: Any) -> Any:
        if not ok(v):
            raise _error(message, value=repr(v))
        return v

    return BeforeValidator(check)


def _axis_values(v: Any) -> Any:
    if isinstance(v, dict):  # `{key}`: the key it stands at (problems_from_validation)
        raise _error("needs a list of values, found a mapping; write the full key path with dots (e.g. {key}.{first}: [...])",
                     first=str(next(iter(v), "key")))
    if not isinstance(v, list) or not v:
        raise _error("needs a non-empty list of values (got {value}); a value for every run belongs in set:", value=repr(v))
    return v


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _matching(pattern: str | re.Pattern) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and re.match(pattern, v) is not None


KeyPath = Annotated[str, _checked(_matching(KEY_PATTERN), KEY_PATH)]
AxisName = Annotated[str, _checked(_matching(AXIS_PATTERN), "axis name {value} must be a word (letters, digits, '_', '-'): it names a results column")]
VariantName = Annotated[str, _checked(_matching(NAME_PATTERN), "variant name {value} must be letters, digits, '_', '.', '-'")]
Overrides = Annotated[dict[KeyPath, Any], _section("must be a mapping of key paths to values")]
Axes = Annotated[dict[KeyPath, Annotated[list, BeforeValidator(_axis_values)]], _section("must be a mapping of key paths to lists of values")]
_NAMED = "needs named variants: {name: {key.path: value, ...}, ...}"
_AXES = "must map an axis name (e.g. method) to named variants"
Variants = Annotated[dict[AxisName, Annotated[
    dict[VariantName, Annotated[dict[KeyPath, Any], _section("must be a mapping of key paths to values (as set:)")]],
    _section(_NAMED, empty=_NAMED)]], _section(_AXES, empty=_AXES)]


def _slurm_section(v: Any) -> Any:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _error("must be a mapping (partition, time, gpus_per_node, cpus_per_task, ...)")
    return v


def _minutes(v: Union[int, str]) -> int:
    """SLURM time: minutes, or "MM:SS", "HH:MM:SS", "D-HH:MM:SS", "D-HH"."""
    if isinstance(v, int):
        return v
    s = str(v).strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
        parts = [int(x) for x in s.split(":")]
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
    else:
        parts = [int(x) for x in s.split(":")]
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            h, m, sec = 0, parts[0], parts[1]
        else:
            h, m, sec = parts
    return days * 1440 + h * 60 + m + (1 if sec else 0)


class SlurmOptions(StrictModel):
    """The grid file's `slurm:` section (command-line flags override it)."""

    partition: Optional[str] = Field(None, description="SLURM partition.")
    time: Union[int, str] = Field(60, description="Time limit per run: minutes, or HH:MM:SS / D-HH:MM:SS.")
    gpus_per_node: Optional[int] = Field(None, ge=0, le=64, description="GPUs per run.")
    cpus_per_task: Optional[int] = Field(None, ge=1, le=1024, description="CPUs per run.")
    mem_gb: Optional[float] = Field(None, gt=0, description="Memory per run, in GB.")
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = Field(256, ge=1, description="At most this many runs of the array at once.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run in the job before the run (module load, conda activate).")
    additional: dict[str, Any] = Field(default_factory=dict, description="Any other sbatch option, e.g. {mail-type: END}.")

    def minutes(self) -> int:
        try:
            m = _minutes(self.time)
        except ValueError:
            raise PabError(f"slurm time {self.time!r} is not minutes or [D-]HH:MM:SS") from None
        if m <= 0:
            raise PabError(f"slurm time {self.time!r} must be positive")
        return m


class GridFile(StrictModel):
    """A grid file: a base spec, and the overrides that make its runs."""

    base: Annotated[str, _checked(_text, "required: the path of the base spec (relative to this file)")] = Field(
        None, validate_default=True, description="The base spec, relative to this file.")
    name: Annotated[Optional[str], _checked(_matching(NAME_PATTERN), "grid name {value} " + NAME_RULE)] = Field(
        None, description="The grid's name (default: the file's stem).")
    variants: Variants = Field(
        default_factory=dict, description="Axes of named override sets, each varied slowest: {axis: {variant: {key.path: value}}}.")
    grid: Axes = Field(default_factory=dict, description="Key paths and their values: every combination runs (first key slowest).")
    zip: Axes = Field(default_factory=dict, description="Key paths whose lists (of equal lengths) vary together.")
    set: Overrides = Field(default_factory=dict, description="Key paths and the value every run gets.")
    slurm: Annotated[SlurmOptions, BeforeValidator(_slurm_section)] = Field(default_factory=SlurmOptions)

    def cross_problems(self) -> Found:
        """What is wrong across sections: zip lists of unequal lengths, a key set in two sections."""
        problems: Found = []
        lengths = {k: len(v) for k, v in self.zip.items()}
        first = next(iter(lengths), None)
        for k, n in lengths.items():
            if n != lengths[first]:
                problems.append((("zip", k), f"zip lists must have equal lengths: {k} has {n} values, {first} has {lengths[first]}"))
        seen: dict[str, str] = {}
        for section in ("variants", "grid", "zip", "set"):
            for k in getattr(self, section):
                if k in seen:
                    problems.append(((section, k), f"{k} is set in both {seen[k]}: and {section}:"))
                seen.setdefault(k, section)
        return problems


GRID_KEYS = tuple(GridFile.model_fields)
