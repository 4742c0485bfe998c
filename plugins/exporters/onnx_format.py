"""`onnx`: the plain architecture (PSG and edge-popup layers as the Conv2d/Linear they wrap) with
the masked weights, as an ONNX graph with a free batch dimension; checked after writing by running
it in ONNX Runtime beside torch on a batch (the logits must agree within `tolerance`)."""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from pab_framework import artifacts
from pab_framework.errors import PabError
from pab_framework.export import ExportSource, require


class Onnx:
    """The masked network as an ONNX graph, verified in ONNX Runtime (needs the `export` extra)."""

    suffix = ".onnx"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tolerance: float = Field(1e-4, gt=0, description="Largest |logit difference| allowed between ONNX Runtime and torch.")
        check_batch: int = Field(4, ge=1, le=1024, description="Inputs in the checking batch.")

    def write(self, params: "Onnx.Params", src: ExportSource, path: Path) -> str:
        onnx = require("onnx", "export", "the onnx format")
        ort = require("onnxruntime", "export", "checking the onnx format")
        require("onnxscript", "export", "the onnx format")
        model = src.module()
        shape = tuple(src.recipe["data_info"]["input_shape"])
        g = torch.Generator().manual_seed(0)
        example = torch.randn((2, *shape), generator=g)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), verbose=False)
        data = program.model_proto.SerializeToString()
        onnx.checker.check_model(program.model_proto)
        x = torch.randn((params.check_batch, *shape), generator=g)
        with torch.no_grad():
            want = model(x)
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(["logits"], {"input": x.numpy()})[0])
        diff = float((got - want).abs().max())
        if not diff <= params.tolerance:
            raise PabError(f"{src.dir}: the ONNX graph's logits differ from torch's by {diff:.3g} (tolerance {params.tolerance:g}); "
                           f"nothing was written")
        artifacts.atomic_write_bytes(path, data)
        return f"ONNX Runtime agrees: max |logit difference| {diff:.2g} on {params.check_batch} inputs"
