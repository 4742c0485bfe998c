"""`pab report RUN_DIR`: one self-contained HTML page (PNG figures embedded) and the PNGs beside it.

RUN_DIR is a stage directory (`runs/<name>/<stage>-<key12>/`), an experiment directory holding
stage directories, or a grid directory holding `results.json` (or `results.csv`). Nothing here
knows a plugin's names: the series are whatever the run recorded. Nothing needs a network or a
browser; matplotlib draws with its Agg canvas.

The package, by concern: `build` (what RUN_DIR holds; writing the files), `stages` (a stage's
section), `grids` (a grid's section), `cost` (parameters, FLOPs, weight memory), `draw` (the
figures), `page` (sections, tables and the HTML).
"""
from __future__ import annotations

from .build import Report, build_report
from .cost import model_cost, stage_model_cost

__all__ = ["Report", "build_report", "model_cost", "stage_model_cost"]
