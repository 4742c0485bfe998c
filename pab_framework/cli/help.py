"""Help that reads as words: `pab run [OPTIONS] SPEC`, flags without a type beside them, a
docstring's paragraphs reflowed to the terminal."""
from __future__ import annotations

import inspect

from typer.core import TyperCommand, TyperGroup


def reflow(text: str | None) -> str | None:
    """A docstring's paragraphs, each on one line: the help wraps them to the terminal."""
    if not text:
        return text
    paras = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paras)


def plain_flags(params) -> list:
    """A flag takes no value: no `<bool>` beside it in the help (typer's rich help shows one)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(TyperCommand):
    """A command whose help is reflowed, whose flags show no type, and whose usage line names its
    arguments (`pab run [OPTIONS] SPEC`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)

    def get_params(self, ctx):
        return plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                word = p.metavar or (p.name or "").upper()
                pieces.append(word if p.required else f"[{word}]")
        return pieces


class Group(TyperGroup):
    """The `pab` group: its flags (--version, --help) show no type."""

    def get_params(self, ctx):
        return plain_flags(super().get_params(ctx))
