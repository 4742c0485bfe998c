"""`pab`: the command line. It parses and prints; the work is pab_framework's.

By concern: `app` (the command, --version, the entry point), `help` (how the help reads),
`output` (the consoles, a user's error as one line and its exit code), `run` (run, validate),
`grid`, `results` (results, report), `plugins` (plugins, schema), `tables` (what they print).
"""
from __future__ import annotations

from .app import app, main

__all__ = ["app", "main"]
