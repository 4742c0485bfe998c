import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
