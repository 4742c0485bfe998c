"""Ablation grids: one file expands into many runs of a base spec; runs that share a stage (same
content key) share its directory, so it is computed once; runs go K at a time on this machine or
as a SLURM array through submitit; the results are one table (`results.csv`, `results.json`).

A grid file::

    base: cifar10_r18_pab.yaml            # a spec, relative to this file
    name: ablation_pruners                # optional; default: the file's stem
    variants:                             # optional: an axis of named override sets (slowest)
      method:
        pab: {stages.train.optimizer.name: bop}
        dense: {stages: {train: {kind: train, epochs: 60}}}
    grid:                                 # cartesian product, first key varies slowest
      stages.prune.pruner.name: [synflow, magnitude]
      seed: [0, 1, 2]
    zip:                                  # optional: lists of equal length that vary together
      stages.train.optimizer.ar: [1.0e-3, 1.0e-4]
      stages.train.optimizer.tau: [1.0e-6, 1.0e-7]
    set: {stages.train.epochs: 60}        # optional: the same override for every run
    slurm: {partition: gpu, time: "12:00:00", gpus_per_node: 1, cpus_per_task: 8}

Every run keeps the base spec's `name`, so its stages go where a single `pab run` of the same
spec would put them, and any stage already computed there (by a run, or another grid) is reused.
The grid's own directory, `<runtime.output_dir>/<grid name>/`, holds the results and run logs.

The package, by concern: `model` (the grid file's pydantic model, its `slurm:` options and the
checks across sections), `gridfile` (reading and expanding a grid file into runs), `plan` (stage
directories shared between runs), `executors` (one run; local workers; SLURM through
submitit), `slurm` (submitit executors and sbatch), `results` (the table and seed statistics).
"""
from __future__ import annotations

from .executors import GridOutcome, run_grid, run_one
from .gridfile import GRID_KEYS, Grid, GridError, Run, expand, load_grid, looks_like_grid, short_names
from .model import SlurmOptions
from .plan import StagePlan, check_runs_data, plan_grid, plan_summary
from .results import RESULTS_CSV, RESULTS_JSON, load_results, over_seeds, write_results
from .slurm import make_submitit_executor, sbatch_script, slurm_folder, slurm_parameters

__all__ = ["GRID_KEYS", "Grid", "GridError", "GridOutcome", "RESULTS_CSV", "RESULTS_JSON", "Run", "SlurmOptions", "StagePlan", "check_runs_data", "expand",
           "load_grid", "load_results", "looks_like_grid", "make_submitit_executor", "over_seeds", "plan_grid", "plan_summary",
           "run_grid", "run_one", "sbatch_script", "short_names", "slurm_folder", "slurm_parameters", "write_results"]
