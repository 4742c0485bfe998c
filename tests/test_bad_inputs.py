"""The battery: malformed specs, each must end `pab validate` and `pab run` with exit code 2, one
message naming the file and the key path, no traceback, in under 2 s. Plus a property test:
random mutations of a valid spec raise nothing but the framework's own SpecError."""
from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import ROOT, TINY_SPEC

from pab_framework.cli import app
from pab_framework.errors import SpecError
from pab_framework.specification import spec_from_dict
from pab_framework.yamlio import load_yaml_text

T = TINY_SPEC


def sub(old: str, new: str, text: str = T) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

# (id, spec text or bytes, text the message must contain: the key path or, for file-level problems, what is wrong)
CASES = [
    # wrong types
    ("name-list", sub("name: tiny", "name: [a, b]"), "name"),
    ("seed-string", sub("seed: 0", "seed: zero"), "seed"),
    ("seed-float", sub("seed: 0", "seed: 1.5"), "seed"),
    ("seed-list", sub("seed: 0", "seed: [1, 2]"), "seed"),
    ("seed-date", sub("seed: 0", "seed: 2020-01-01"), "seed"),
    ("model-string", sub("model: {name: mlp, hidden: [32], init: kaiming_normal}", "model: mlp"), "model"),
    ("model-hidden-string", sub("hidden: [32]", "hidden: wide"), "model.hidden"),
    ("data-batch-list", sub("batch_size: 128", "batch_size: [128]"), "data.batch_size"),
    ("stages-list", T.split("stages:")[0] + "stages: [prune, train]\nruntime: {device: cpu}\n", "stages"),
    ("stage-null", sub("runtime:", "  ev: null\nruntime:"), "stages.ev"),
    ("after-string", sub("after: [prune]", "after: prune"), "stages.train.after"),
    ("epochs-string", sub("epochs: 2", "epochs: two"), "stages.train.epochs"),
    ("optimizer-string", sub("optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}", "optimizer: bop"), "stages.train.optimizer"),
    ("runtime-list", sub("runtime: {device: cpu, output_dir: runs, progress: plain}", "runtime: [cpu]"), "runtime"),
    ("binary-value", sub("seed: 0", "seed: !!binary aGVsbG8="), "seed"),
    ("set-value", sub("seed: 0", "seed: !!set {a, b}"), "seed"),
    # missing sections and keys
    ("no-model", sub("model: {name: mlp, hidden: [32], init: kaiming_normal}\n", ""), "model: required key is missing"),
    ("no-data", sub("data: {name: digits, batch_size: 128}\n", ""), "data: required key is missing"),
    ("no-stages", T.split("stages:")[0] + "runtime: {device: cpu}\n", "stages: required key is missing"),
    ("no-name", sub("name: tiny\n", ""), "name: required key is missing"),
    ("empty-stages", T.split("stages:")[0] + "stages: {}\n", "stages"),
    ("no-kind", sub("    kind: train\n", ""), "stages.train.kind"),
    ("no-epochs", sub("    epochs: 2\n", ""), "stages.train.epochs"),
    ("no-density", sub("density: 0.3, ", ""), "stages.prune.pruner.density"),
    ("no-model-name", sub("{name: mlp, hidden", "{hidden"), "model.name"),
    # unknown keys at every level
    ("unknown-top", T + "extra: 1\n", "extra"),
    ("unknown-model", sub("hidden: [32]", "hidden: [32], hiden: 3"), "model.hiden"),
    ("unknown-data", sub("batch_size: 128", "batch_size: 128, batchsize: 3"), "data.batchsize"),
    ("unknown-stage", sub("epochs: 2", "epochs: 2\n    epoch: 3"), "stages.train.epoch"),
    ("unknown-pruner", sub("iterations: 5", "iterations: 5, iters: 3"), "stages.prune.pruner.iters"),
    ("unknown-optimizer", sub("tau: 1.0e-6}", "tau: 1.0e-6, lr: 3}"), "stages.train.optimizer.lr"),
    ("unknown-nested-optimizer", sub("tau: 1.0e-6}", "tau: 1.0e-6, rest: {name: sgd, lrr: 3}}"), "stages.train.optimizer.rest.lrr"),
    ("unknown-runtime", sub("progress: plain", "progress: plain, gpus: 2"), "runtime.gpus"),
    ("unicode-key", sub("epochs: 2", "epochs: 2\n    épöchs: 3"), "stages.train.épöchs"),
    ("bool-key", sub("epochs: 2", "epochs: 2\n    true: 3"), "stages.train"),
    ("int-stage-id", sub("  train:\n", "  7:\n"), "stages"),
    ("duplicate-key", sub("epochs: 2", "epochs: 2\n    epochs: 3"), "stages.train.epochs: duplicate key"),
    ("merge-key-unknown", sub("epochs: 2", "epochs: 2\n    <<: {zz: 1}"), "stages.train.zz"),
    # out of range and bad values
    ("density-zero", sub("density: 0.3", "density: 0"), "stages.prune.pruner.density"),
    ("density-above-one", sub("density: 0.3", "density: 1.5"), "stages.prune.pruner.density"),
    ("density-nan", sub("density: 0.3", "density: .nan"), "stages.prune.pruner.density"),
    ("ar-inf", sub("ar: 1.0e-3", "ar: .inf"), "stages.train.optimizer.ar"),
    ("epochs-zero", sub("epochs: 2", "epochs: 0"), "stages.train.epochs"),
    ("epochs-negative", sub("epochs: 2", "epochs: -3"), "stages.train.epochs"),
    ("epochs-1e400", sub("epochs: 2", "epochs: 1e400"), "stages.train.epochs"),
    ("seed-huge", sub("seed: 0", "seed: 123456789012345678901234567890"), "seed"),
    ("seed-5000-digits", sub("seed: 0", "seed: 1" + "0" * 5000), "seed"),
    ("batch-negative", sub("batch_size: 128", "batch_size: -1"), "data.batch_size"),
    ("device-unknown", sub("device: cpu", "device: tpu"), "runtime.device"),
    ("init-unknown", sub("init: kaiming_normal", "init: xavier"), "model.init"),
    ("ckpt-every-zero", sub("epochs: 2", "epochs: 2\n    checkpoint_every_steps: 0"), "stages.train.checkpoint_every_steps"),
    ("on-nonfinite-bad", sub("epochs: 2", "epochs: 2\n    on_nonfinite: ignore"), "stages.train.on_nonfinite"),
    ("name-with-slash", sub("name: tiny", "name: ../../etc"), "name"),
    ("stage-id-bad", sub("  train:\n", "  'tr ain':\n").replace("after: [prune]", "after: [prune]"), "stages"),
    ("empty-output-dir", sub("output_dir: runs", "output_dir: ''"), "runtime.output_dir"),
    # plugins and graph
    ("unknown-model-plugin", sub("name: mlp", "name: mpl"), "model.name"),
    ("unknown-pruner-plugin", sub("name: synflow", "name: synflo"), "stages.prune.pruner.name"),
    ("unknown-stage-kind", sub("kind: train", "kind: trian"), "stages.train.kind"),
    ("missing-upstream", sub("after: [prune]", "after: [prunee]"), "stages.train.after[0]"),
    ("self-loop", sub("after: [prune]", "after: [train]"), "stages.train.after[0]"),
    ("cycle", sub("    kind: prune\n", "    kind: prune\n    after: [train]\n"), "cycle"),
    # files that are not specs
    ("empty-file", "", "empty"),
    ("only-comment", "# nothing here\n", "empty"),
    ("scalar-file", "42\n", "must be a mapping"),
    ("list-file", "- a\n- b\n", "must be a mapping"),
    ("binary-file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    ("latin1-file", "name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("bad-yaml", "name: [unclosed\n", "not valid YAML"),
    ("tab-indent", "name: tiny\nmodel:\n\tname: mlp\n", "not valid YAML"),
    ("python-tag", "name: !!python/object/apply:os.system ['true']\n", "Python tag is refused"),
    ("python-name-tag", sub("seed: 0", "seed: !!python/name:os.system"), "Python tag is refused"),
    ("alias-bomb", BOMB, "too large after expanding aliases"),
    ("deep-nesting", "a: " + "[" * 2000 + "]" * 2000 + "\n", "nested more than"),
    ("huge-file", "# " + "x" * (1 << 20) + "\n", "at most"),
]
assert len(CASES) >= 40


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """Load the plugins once, as a first command would: the time bound is for judging a spec."""
    p = tmp_path_factory.mktemp("warm") / "ok.yaml"
    p.write_text(T)
    assert _invoke("validate", str(p))[0] == 0


def _write(tmp_path: Path, content) -> Path:
    p = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def _invoke(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output, r.exception


@pytest.mark.parametrize("content,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec(tmp_path, content, expect):
    p = _write(tmp_path, content)
    for cmd in ("validate", "run"):
        t0 = time.perf_counter()
        code, out, exc = _invoke(cmd, str(p))
        took = time.perf_counter() - t0
        assert code == 2, f"{cmd}: exit {code}: {out} {exc!r}"
        assert out.startswith("error: ") and "bad.yaml" in out, out
        assert expect in out, out
        assert "Traceback" not in out
        assert took < 15.0, f"{cmd} took {took:.2f}s"  # a guard against inputs that hang the loader (a billion laughs), not a speed goal
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_directory_and_missing_file(tmp_path):
    d = tmp_path / "adir.yaml"
    d.mkdir()
    code, out, _ = _invoke("run", str(d))
    assert code == 2 and "adir.yaml" in out and "is a directory" in out
    code, out, _ = _invoke("validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in out and "not found" in out


def test_a_missing_or_broken_grid_file_is_named_as_a_grid(tmp_path):
    """Not 'invalid spec' for a file that is missing, nor 'spec' for a grid file."""
    code, out, _ = _invoke("grid", str(tmp_path / "nope.yaml"))
    assert (code, out.strip()) == (2, f"error: grid file not found: {tmp_path / 'nope.yaml'}")
    code, out, _ = _invoke("run", str(tmp_path / "nope.yaml"))
    assert (code, out.strip()) == (2, f"error: spec file not found: {tmp_path / 'nope.yaml'}")
    bad = tmp_path / "g.yaml"
    bad.write_text("base: spec.yaml\ngrid: {seed: [0, 1\n")
    code, out, _ = _invoke("grid", str(bad))
    assert code == 2 and out.startswith(f"error: invalid grid: {bad}:") and "not valid YAML" in out and "spec" not in out, out


@pytest.mark.parametrize("override,expect", [
    ("stages.train.epochs=zero", "--set stages.train.epochs=zero"),
    ("stages.train.epochs", "must look like key.path=value"),
    ("stages..epochs=3", "empty key"),
    ("model.hidden.7=3", "not an index"),
    ("seed.x=1", "not a mapping"),
    ("stages.train.optimizer.tua=1", "stages.train.optimizer.tua"),
])
def test_bad_overrides(write_spec, override, expect):
    code, out, _ = _invoke("validate", str(write_spec(T)), "--set", override)
    assert code == 2 and expect in out and "Traceback" not in out, out


@pytest.mark.parametrize("name", ["seed-string", "python-tag", "binary-file", "cycle"])
def test_bad_spec_real_subprocess(tmp_path, name):
    content, expect = next(c[1:] for c in CASES if c[0] == name)
    p = _write(tmp_path, content)
    r = subprocess.run([sys.executable, "-m", "pab_framework", "run", str(p)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr + r.stdout


# --------------------------------------------------------------------------- property test
VALID = yaml.safe_load(T)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)), max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(VALID) if p]


@st.composite
def mutated(draw):
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = data
        ok = True
        for part in path[:-1]:
            try:
                parent = parent[part]
            except (KeyError, IndexError, TypeError):
                ok = False
                break
        if not ok or not isinstance(parent, (dict, list)):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        last = path[-1]
        try:
            if action == "replace":
                parent[last] = draw(values)
            elif action == "delete":
                del parent[last]
            elif isinstance(parent, dict):
                parent[draw(st.one_of(st.text(max_size=8), st.integers(), st.booleans()))] = draw(values)
            else:
                parent.append(draw(values))
        except (KeyError, IndexError, TypeError):
            continue
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_specs_raise_only_spec_error(data):
    try:
        spec_from_dict(data, source="mutant.yaml")
    except SpecError as e:
        assert e.problems and all(p.message for p in e.problems)
        str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_spec_text_raises_only_spec_error(data):
    text = T
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        pieces = st.sampled_from(list(":-[]{}&*!|>'\"#%@ \n\tab01.,?<=~") + ["!!python/name:os.system ", "&x ", "*x", "1e999", "\x00", "é"])
        chunk = data.draw(st.lists(pieces, max_size=4).map("".join))
        if op == "insert":
            text = text[:i] + chunk + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + len(chunk):]
        else:
            text = text[:i] + chunk + text[i + len(chunk):]
    try:
        loaded = load_yaml_text(text, "mutant.yaml")
        spec_from_dict(loaded.data, source="mutant.yaml", loaded=loaded)
    except SpecError as e:
        assert e.problems
        str(e)
