"""Errors a user can cause. Each ends a command with one clear message and exit code 2."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class PabError(Exception):
    """Base of every error the user can fix (bad spec, missing data, unknown plugin...)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


def install_command(extra: str) -> str:
    """The command that installs pab's `extra` where this pab came from: `pip install -e
    '/path/to/pab[extra]'` when pab runs from its source folder (a clone, installed in editable
    mode), `pip install 'pab[extra]'` when it was installed from a wheel."""
    source = Path(__file__).resolve().parents[1]
    if (source / "pyproject.toml").is_file() and (source / "plugins").is_dir():
        return f"pip install -e '{source}[{extra}]'"
    return f"pip install 'pab[{extra}]'"


@dataclass
class Problem:
    """One thing wrong in a spec: where (file, line, key path) and what."""

    path: tuple  # key path inside the spec, e.g. ("stages", "prune", "pruner", "density")
    message: str
    line: int | None = None
    source: str | None = None  # file name, or "--set" for a command-line override

    def where(self) -> str:
        parts = []
        if self.source:
            parts.append(self.source if self.line is None else f"{self.source}:{self.line}")
        if self.path:
            parts.append(format_path(self.path))
        return ", ".join(parts)

    def render(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


def format_path(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


@dataclass
class SpecError(PabError):
    """A spec (or grid file) that does not validate. Carries every problem found."""

    problems: list[Problem] = field(default_factory=list)
    title: str = "invalid spec"

    def __post_init__(self):
        PabError.__init__(self, self.render())

    def render(self) -> str:
        lines = [f"{self.title}:" if len(self.problems) != 1 else f"{self.title}: {self.problems[0].render()}"]
        if len(self.problems) != 1:
            lines += [f"  - {p.render()}" for p in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


class PluginError(PabError):
    """A plugin that cannot be found or loaded."""


class DataError(PabError):
    """Data that is missing or unreadable. `key`: the dataset parameter at fault (`root`, say),
    so that the message can name the spec's line of `data.<key>`."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ArtifactError(PabError):
    """An artifact (checkpoint, model.pt) that is missing, corrupted or unsafe."""


class TrainingError(PabError):
    """Training that cannot go on (a non-finite loss, say)."""


class WriteError(PabError):
    """A file could not be written (a full disk, say); what was there before is intact."""

    exit_code = 4
