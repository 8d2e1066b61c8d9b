"""The paper's picture and its zooms: a grid of the paper's MLP at the notebook's default view (log10 lr in [-3, 6]
on both axes: columns = layer-0 lr, rows = layer-1 lr), then grids of the same resolution inside the boxes of it
with the most boundary (boxes.boundary_boxes), and a zoom inside the best zoom. Reports the trainable fraction and
the box-counting dimension of the boundary of each (the paper: 1.17 to 1.98 on deep zooms; a full view at low
resolution should read near 1), writes the pictures (plot.paper_image), a zoom GIF (animate) and a JSON.

    uv run python benchmarks/paper_zoom.py                      # 256 x 256, tanh, width 8, 100 steps: a few minutes on
    2 cores uv run python benchmarks/paper_zoom.py --size 64 --out_dir /tmp/zoom
"""

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))  # `common` beside this file, however the script is started
from common import RESULTS_DIR, write_json  # noqa: E402

from fractal_vmap.analysis.animate import Level, write_animation  # noqa: E402
from fractal_vmap.analysis.boxes import boundary_boxes, box_values  # noqa: E402
from fractal_vmap.analysis.fractal import fractal_dimension  # noqa: E402
from fractal_vmap.analysis.labels import convergence_measure  # noqa: E402
from fractal_vmap.analysis.pictures import paper_image  # noqa: E402
from fractal_vmap.machine import tune_allocator  # noqa: E402
from fractal_vmap.tasks.paper.mlp import DEFAULT_VIEW, PaperConfig, paper_grid  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass
class Options:
    size: int = 256  # cells per side of every grid
    width: int = 8
    activation: str = "tanh"
    steps: int = 100
    seed: int = 0
    view: list[float] = field(default_factory=lambda: list(DEFAULT_VIEW))  # log10 lr range of both axes
    box_frac: float = 1 / 16  # zoom box side as a fraction of the grid side
    boxes: int = 2  # zooms into the full view (the densest boxes, non-overlapping)
    out_dir: str = ""  # default benchmarks/results/paper_zoom


def run_view(cfg: PaperConfig, name: str, rows: np.ndarray, cols: np.ndarray, out_dir: Path) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    losses = paper_grid(cfg, rows, cols)
    seconds = time.perf_counter() - t0
    m = convergence_measure(losses.permute(1, 2, 0).numpy())
    dim = fractal_dimension(m)
    title = (
        f"{name}: log10 lr1 {np.log10(rows[0]):.5g}..{np.log10(rows[-1]):.5g}, lr0 "
        f"{np.log10(cols[0]):.5g}..{np.log10(cols[-1]):.5g}"
    )
    png = paper_image(m, rows, cols, "lr1 (output layer)", "lr0 (input layer)", out_dir / f"{name}.png", title=title)
    row = {
        "name": name,
        "log10_rows": [float(np.log10(rows[0])), float(np.log10(rows[-1]))],
        "log10_cols": [float(np.log10(cols[0])), float(np.log10(cols[-1]))],
        "seconds": seconds,
        "trainable_fraction": float((m < 0).mean()),
        "dimension": dim["dimension"],
        "dimension_median_local": dim["dimension_median_local"],
        "edge_pixels": dim["edge_pixel_count"],
        "box_sizes": dim["sizes"],
        "box_counts": dim["counts"],
        "png": str(png),
    }
    console.print(
        f"{name}: {seconds:.1f} s, trainable {row['trainable_fraction']:.3f}, dimension {dim['dimension']:.3f} "
        f"(median local {dim['dimension_median_local']:.3f}), {dim['edge_pixel_count']} edge pixels"
    )
    return row, m


def zoom_axes(box, rows: np.ndarray, cols: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A size x size log-spaced grid from the box's first to its last cell."""
    r0, r1, c0, c1 = box_values(box, rows, cols)
    return np.logspace(np.log10(r0), np.log10(r1), size), np.logspace(np.log10(c0), np.log10(c1), size)


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_arguments(Options, dest="opts")
    opts: Options = parser.parse_args().opts
    tune_allocator()
    out_dir = Path(opts.out_dir) if opts.out_dir else RESULTS_DIR / "paper_zoom"
    cfg = PaperConfig(width=opts.width, activation=opts.activation, steps=opts.steps, seed=opts.seed)
    size, box_side = opts.size, max(2, round(opts.size * opts.box_frac))
    rows = cols = np.logspace(opts.view[0], opts.view[1], size)
    full, m = run_view(cfg, "full", rows, cols, out_dir)
    results = [full]
    chain = [Level(m, rows, cols)]
    for i, box in enumerate(boundary_boxes(m, box_side, opts.boxes)):
        zr, zc = zoom_axes(box, rows, cols, size)
        row, zm = run_view(cfg, f"zoom{i}", zr, zc, out_dir)
        results.append(
            row | {"box": [box.row0, box.row1, box.col0, box.col1], "box_edges": box.edges, "parent": "full"}
        )
        if i == 0:  # the chain for the GIF: full -> zoom0 -> the densest box inside zoom0
            chain[0].box = (box.row0, box.row1, box.col0, box.col1)
            chain.append(Level(zm, zr, zc))
            inner = boundary_boxes(zm, box_side, 1)
            if inner:
                chain[1].box = (inner[0].row0, inner[0].row1, inner[0].col0, inner[0].col1)
                zzr, zzc = zoom_axes(inner[0], zr, zc, size)
                row2, zzm = run_view(cfg, "zoom0-0", zzr, zzc, out_dir)
                results.append(row2 | {"box": list(chain[1].box), "box_edges": inner[0].edges, "parent": "zoom0"})
                chain.append(Level(zzm, zzr, zzc))
    animation = write_animation(chain, out_dir / "zoom.gif", size=512)

    table = Table(
        title=(
            f"paper MLP {size}x{size}, width {opts.width}, {opts.activation}, {opts.steps} steps, float64 (shared "
            "CPU: seconds are noisy)"
        )
    )
    for col in (
        "view",
        "log10 lr1 (rows)",
        "log10 lr0 (cols)",
        "trainable",
        "dimension",
        "median local",
        "edge px",
        "s",
    ):
        table.add_column(col)
    for r in results:
        table.add_row(
            r["name"],
            "{:.4g} .. {:.4g}".format(*r["log10_rows"]),
            "{:.4g} .. {:.4g}".format(*r["log10_cols"]),
            f"{r['trainable_fraction']:.3f}",
            f"{r['dimension']:.3f}",
            f"{r['dimension_median_local']:.3f}",
            str(r["edge_pixels"]),
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    out = write_json(
        {"options": asdict(opts), "views": results, "gif": str(animation["gif"]), "mp4": str(animation["mp4"])},
        out_dir / "paper_zoom.json",
    )
    console.print(f"wrote {out} and the pictures beside it")


if __name__ == "__main__":
    main()
