"""`pab schema > pab.schema.json` is a JSON Schema that editors' YAML language servers can use."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from conftest import CONFIGS, ROOT, TINY_SPEC

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def validator():
    out = subprocess.run([sys.executable, "-m", "pab_framework", "schema"], cwd=ROOT, capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)  # stdout is the schema and nothing else
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema)


def errors(v, doc):
    return [e.message for e in v.iter_errors(doc)]


def test_valid_specs_validate(validator):
    assert errors(validator, yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())) == []
    assert errors(validator, yaml.safe_load(TINY_SPEC)) == []
    # trackers by name alone or with their parameters
    trackers = yaml.safe_load(TINY_SPEC.replace("progress: plain", "progress: plain, loggers: [jsonl, csv, {name: mlflow, tracking_uri: 'sqlite:///m.db', every_s: 0}]"))
    assert errors(validator, trackers) == []


@pytest.mark.parametrize("path,value", [
    ((), ("bogus", 1)),                                        # unknown top-level key
    (("stages", "prune", "pruner"), ("densty", 0.3)),          # misspelled framework key
    (("stages", "train", "optimizer"), ("arr", 0.1)),          # misspelled plugin key
    (("runtime",), ("loggers", ["wandbb"])),                   # unknown logger
    (("runtime",), ("loggers", [{"name": "mlflow", "tracking_urii": "x"}])),  # misspelled logger key
    (("stages", "prune", "pruner"), ("density", 1.5)),         # out of range
    (("model",), ("name", "no_such_model")),                   # unknown plugin
])
def test_bad_specs_do_not(validator, path, value):
    doc = copy.deepcopy(yaml.safe_load((CONFIGS / "quickstart.yaml").read_text()))
    cur = doc
    for p in path:
        cur = cur[p]
    cur[value[0]] = value[1]
    assert errors(validator, doc)
