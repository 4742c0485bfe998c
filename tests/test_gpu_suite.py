"""benchmarks/gpu_suite.py's plumbing: parts that succeed, fail or run out of time are recorded,
pytest's outcomes are read, and the last line is one JSON object."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def test_parts_are_recorded_whatever_happens():
    env = dict(os.environ)
    ok = gpu_suite.run_part("a", [sys.executable, "-c", "print('table'); print('{\"x_ms\": 1.5}')"], 60, env)
    assert ok["status"] == "ok" and ok["figures"] == {"x_ms": 1.5}
    bad = gpu_suite.run_part("b", [sys.executable, "-c", "import sys; print('half'); sys.exit('boom')"], 60, env)
    assert bad["status"] == "failed" and bad["rc"] == 1 and "boom" in bad["tail"] and "figures" not in bad
    no_json = gpu_suite.run_part("c", [sys.executable, "-c", "print('no figures')"], 60, env)
    assert no_json["status"] == "failed"
    slow = gpu_suite.run_part("d", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2, env)
    assert slow["status"] == "timeout" and "started" in slow["tail"] and slow["wall_s"] < 30


def test_pytest_outcomes_are_read_even_from_a_cut_run():
    out = """tests/test_cuda.py::test_a[x] PASSED                     [ 10%]
tests/test_cuda.py::test_b FAILED                        [ 20%]
tests/test_cuda.py::test_c SKIPPED (needs CUDA)          [ 30%]
tests/test_cuda.py::test_d"""
    f = gpu_suite.test_figures(out)
    assert f["passed"] == 1 and f["failed"] == ["test_b"] and f["skipped"] == 1


def test_suite_ends_with_one_json_object():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--quick", "--parts", "tests,tests",
                        "--budget", "120"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(last["parts"]) == ["tests", "tests#2"] and last["device"] == "cpu" and last["quick"] is True  # named twice: run twice
    for t in last["parts"].values():
        assert t["status"] == "ok" and t["figures"]["failed"] == []
        assert t["figures"]["passed"] + t["figures"]["skipped"] >= 10
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--parts", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part(s) nope" in bad.stderr


def test_compiled_parts_run_when_named():
    """The compiled parts (issue 25's figures) are the default parts with `--compile` (CUDA graphs on
    CUDA, Inductor's default elsewhere), and run only when named."""
    plan = gpu_suite.parts("cuda", False)
    for name in gpu_suite.COMPILED:
        cmd, base = plan[name][0], plan[name.removesuffix("_compiled")][0]
        assert cmd[: len(base)] == base and cmd[len(base): len(base) + 2] == ["--compile", "reduce-overhead"], name
    assert gpu_suite.parts("cpu", True)["train_cifar_compiled"][0][-4:] == ["--compile", "default", "--epochs", "2"]
    assert not set(gpu_suite.COMPILED) & set(gpu_suite.choose(plan, None)) and "bop_step" in gpu_suite.choose(plan, None)
    assert list(gpu_suite.choose(plan, "psg_step_compiled,bop_step,bop_step")) == ["psg_step_compiled", "bop_step", "bop_step#2"]
