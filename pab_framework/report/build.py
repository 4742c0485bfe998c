"""`pab report RUN_DIR`: find what RUN_DIR holds, make a section of each, write the page and its PNGs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import artifacts
from ..differs import stage_labels
from ..errors import PabError
from .experiments import compare_sections
from .grids import GRID_FILES, grid_section
from .page import Section, render_html
from .stages import has_outputs, stage_section


@dataclass
class Report:
    html: Path
    pngs: list[Path]
    sections: list[Section]


def _sections(root: Path) -> list[Section]:
    """A grid directory's section, or one per stage directory with outputs, in the order they ran,
    after a section per experiment comparing its trained stages (when it has several)."""
    if not root.is_dir():
        raise PabError(f"{root}: not a directory (give a run directory: runs/<name>/, one stage directory, or a grid directory)")
    if any((root / g).is_file() for g in GRID_FILES):
        return [grid_section(root)]
    stage_dirs = [d for d in artifacts.stage_dirs(root, levels=2) if has_outputs(d)]
    if not stage_dirs:
        raise PabError(f"{root}: no stage directories (with spec.yaml and result.json) and no grid results ({', '.join(GRID_FILES)}) here")
    labels = stage_labels(stage_dirs, artifacts.read_stage_doc)
    shown = {d.resolve() for d in stage_dirs}
    return [*compare_sections(stage_dirs, labels), *(stage_section(d, labels.get(d, ""), shown) for d in stage_dirs)]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Write report.html and its PNGs into out_dir (default: run_dir)."""
    root = Path(run_dir)
    sections = _sections(root)
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for s in sections:
        for f in s.figures:
            p = out / f"{f.name}.png"
            artifacts.atomic_write_bytes(p, f.png)
            pngs.append(p)
    page = out / "report.html"
    artifacts.atomic_write_text(page, render_html(f"pab report: {root.resolve().name}", sections))
    return Report(page, pngs, sections)
