"""The experiment spec: pydantic models, plugin sections validated by each plugin's own `Params`,
command-line overrides, and errors that name the file, the line and the key path.

The package, by concern: `calls` (the plugin sections), `models` (the experiment, its stages
and runtime), `problems` (validation errors as messages with "did you mean", placed at file and
line), `overrides` (`--set`), `resolve` (plugins looked up and their parameters validated),
`stagegraph` (references, cycles, rewinding points), `sources` (masks and weights from files),
`finite` (non-finite numbers), `load` (all of it, in order).
"""
from __future__ import annotations

from .calls import DataCall, LoggerCall, ModelCall, OptimizerCall, PluginCall, PluginSection, PrunerCall, QuantizerCall, TransformCall
from .load import load_spec, spec_from_dict
from .models import NAME_PATTERN, ExperimentSpec, RuntimeSpec, Source, StageSpec, StrictModel
from .overrides import apply_override, parse_override, set_path
from .problems import locate, problems_from_validation

__all__ = ["NAME_PATTERN", "DataCall", "ExperimentSpec", "LoggerCall", "ModelCall", "OptimizerCall", "PluginCall", "PluginSection", "PrunerCall",
           "QuantizerCall", "RuntimeSpec", "Source", "StageSpec", "StrictModel", "TransformCall", "apply_override", "load_spec",
           "locate", "parse_override", "problems_from_validation", "set_path", "spec_from_dict"]
