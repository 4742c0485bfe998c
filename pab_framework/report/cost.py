"""What a pruned model costs: parameters, FLOPs of one input and the memory of its weights, dense
and after pruning.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward pass of a single
input through the model rebuilt from the stage's spec.yaml. Sparse FLOPs scale each Conv2d/Linear
layer's dense FLOPs by its kept fraction (what a sparse kernel would execute); every other
operation is counted as dense.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import artifacts, export
from ..errors import PabError
from ..formatting import human_bytes
from ..modelutil import build_model, prunable_parameters
from ..specification import spec_from_dict
from .page import Table


def _flops_by_module(model, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    model.eval()
    x = torch.zeros((1, *input_shape))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    return int(counter.get_total_flops()), {k: int(sum(v.values())) for k, v in counts.items()}


def _layers(model, masks: dict, by_module: dict[str, int]) -> list[dict]:
    """Per prunable weight: kept and total counts, kept fraction, dense and sparse FLOPs."""
    root = type(model).__name__
    layers = []
    for pname, w in prunable_parameters(model).items():
        mname = pname[: -len(".weight")] if pname.endswith(".weight") else ""
        # FlopCounterMode names modules "<RootClass>.<path>" (older torch: "<path>")
        dense = by_module.get(f"{root}.{mname}" if mname else root, by_module.get(mname, 0))
        m = masks.get(pname)
        kept = int(m.sum()) if m is not None else w.numel()
        frac = kept / w.numel() if w.numel() else 1.0
        layers.append({"name": pname, "kept": kept, "total": w.numel(), "fraction": frac, "flops": dense, "sparse_flops": dense * frac})
    return layers


def model_cost(model, masks: dict, input_shape: tuple[int, ...]) -> dict:
    """Parameters, FLOPs (one input) and weight memory of `model`, dense and with `masks` applied."""
    total_flops, by_module = _flops_by_module(model, input_shape)
    layers = _layers(model, masks, by_module)
    n_params = sum(p.numel() for p in model.parameters())
    n_prunable = sum(l["total"] for l in layers)
    n_kept = sum(l["kept"] for l in layers)
    layer_flops = sum(l["flops"] for l in layers)
    sparse_flops = total_flops - layer_flops + sum(l["sparse_flops"] for l in layers)
    other = n_params - n_prunable  # BatchNorm, biases...: float32 in every format
    return {
        "params": n_params,
        "prunable": n_prunable,
        "kept": n_kept,
        "params_after": n_params - (n_prunable - n_kept),
        "flops": total_flops,
        "sparse_flops": sparse_flops,
        "layers": layers,
        "bytes_float32": 4 * n_params,
        "bytes_float32_sparse": 4 * (other + n_kept),
        "bytes_bitmap_signs": (n_prunable + n_kept) / 8 + 4 * other,  # the information: mask bits + sign bits of the survivors
    }


def stage_model_cost(d: Path, doc: dict) -> tuple[dict | None, str]:
    """model_cost() of the stage's model.pt, rebuilt from its spec.yaml; (None, why) when it cannot be."""
    if not (d / artifacts.MODEL).is_file():
        return None, "no model.pt in this stage"
    try:
        spec = spec_from_dict(json.loads(json.dumps(doc["spec"])), source=str(d / artifacts.SPEC))
        info = spec.data.plugin.info(spec.data.params, base_dir=None)
        model = build_model(spec.model, info, spec.seed)
    except PabError as e:
        return None, f"the model could not be rebuilt from spec.yaml: {e}"
    state, masks = artifacts.load_model_artifact(d / artifacts.MODEL)
    note = ""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a quantizer may have wrapped the layers; counts need only shapes and masks
        note = f"model.pt's weights do not load into the rebuilt model ({str(e).splitlines()[0][:120]}); counted from shapes and masks"
    cost = model_cost(model, masks, tuple(info.input_shape))
    cost["file_model_pt"], cost["file_packed"] = export.file_sizes(d)
    return cost, note


def _memory_row(c: dict, label: str, b: float) -> list:
    """A row of bytes: the count, and how it compares with the dense float32 weights."""
    mb = c["bytes_float32"]
    ratio = "" if b == mb else (f", {mb / b:.1f}x smaller" if b else "")
    return [label + " (bytes)", int(math.ceil(b)), human_bytes(b) + ratio]


def _file_rows(c: dict) -> list[list]:
    rows = [_memory_row(c, "model.pt, the file", c["file_model_pt"])]
    if c.get("file_packed") is not None:
        rows.append(_memory_row(c, "packed file (pab export)", c["file_packed"]))
    return rows


def files_table(tag: str, c: dict) -> Table:
    """The stage's own files (model.pt, the packed file): what a stage whose masks another
    section already costs adds."""
    return Table(f"files-{tag}", "Files of this stage's network", ["", "value", ""], _file_rows(c),
                 "Bytes on disk; beside them, how many times smaller than the dense float32 weights.")


def cost_table(tag: str, c: dict) -> Table:
    def mem(label: str, b: float) -> list:
        return _memory_row(c, label, b)

    rows = [
        ["parameters (all)", c["params"], ""],
        ["prunable weights (Conv2d, Linear)", c["prunable"], ""],
        ["prunable weights kept", c["kept"], f"density {c['kept'] / c['prunable']:.4f}" if c["prunable"] else ""],
        ["parameters after pruning", c["params_after"], ""],
        ["FLOPs per input, dense", c["flops"], ""],
        ["FLOPs per input, after pruning", round(c["sparse_flops"]), f"{c['flops'] / c['sparse_flops']:.2f}x fewer" if c["sparse_flops"] else ""],
        mem("weights, float32 (dense)", c["bytes_float32"]),
        mem("weights, float32 values of kept weights only", c["bytes_float32_sparse"]),
        mem("weights, mask bitmap + 1 sign bit per kept weight", c["bytes_bitmap_signs"]),
        *_file_rows(c),
    ]
    return Table(f"cost-{tag}", "Parameters, FLOPs and memory", ["", "value (count; bytes where named)", ""], rows,
                 "FLOPs by torch.utils.flop_counter.FlopCounterMode on one input (a multiply-add counts 2); after pruning, each "
                 "Conv2d/Linear layer's FLOPs are scaled by its kept fraction, other operations stay dense. The mask + sign row "
                 "stores no magnitudes: with sign-only training (Bop) they are the initialisation, regenerated from the seed; the "
                 "other parameters (BatchNorm, biases) count as float32. The last rows are real files: the stage's model.pt and "
                 "what `pab export` writes (packed: lossless, loads back bitwise).")
