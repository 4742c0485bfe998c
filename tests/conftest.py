import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# faults at exact points of a run (tests/hooks/pab_faults.py); its sitecustomize.py installs them in
# the subprocesses of a test that puts HOOKS on their PYTHONPATH (with_hooks)
HOOKS = ROOT / "tests" / "hooks"
for _p in (ROOT, HOOKS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def with_hooks(env: dict) -> dict:
    """`env` with the project and tests/hooks first on PYTHONPATH (for a `pab run` subprocess)."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HOOKS), *filter(None, [env.get("PYTHONPATH")])])}


os.environ.setdefault("CI", "1")  # plain progress lines in tests


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec text into tmp_path and return its path."""

    def _write(text: str, name: str = "spec.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write


TINY_SPEC = """\
name: tiny
seed: 0
model: {name: mlp, hidden: [32], init: kaiming_normal}
data: {name: digits, batch_size: 128}
stages:
  prune:
    kind: prune
    pruner: {name: synflow, density: 0.3, iterations: 5}
  train:
    kind: train
    after: [prune]
    epochs: 2
    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}
runtime: {device: cpu, output_dir: runs, progress: plain}
"""
