"""The calibration table of the box-counting dimension: what the estimator (fractal.py's least-squares slope, over
random placements of the box lattice, `analysis/dimension.py`) reads on boundaries of known dimension
(`analysis/synthetic.py`: four fractal families at true D = 1.1 ... 1.9, four smooth ones at D = 1) at the resolutions
a study produces. Writes fractal_vmap/analysis/calibration.json (which `calibrated_dimension` reads) and a readable
copy, benchmarks/results/calibration.md. Deterministic: every map's seed derives from its family, D, resolution and
index, so a rerun writes the same numbers (bar the cost section).

    uv run python benchmarks/calibrate_dimension.py                        # 16^2 ... 4096^2, about 10 min on 2 cores
    uv run python benchmarks/calibrate_dimension.py --resolutions 64 256   # a part, into --out
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, CpuWatch, cpu_model, git_revision  # noqa: E402

from fractal_vmap.analysis.dimension import CALIBRATION, box_sizes, lattice_estimates  # noqa: E402
from fractal_vmap.analysis.synthetic import FRACTAL, FRACTAL_FAMILIES, SMOOTH_FAMILIES, phase_map  # noqa: E402
from fractal_vmap.perf.timing import own_seconds  # noqa: E402

RESOLUTIONS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DIMENSIONS = [1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]
# maps per (fractal family, D) and per smooth family: fewer where a map costs more and varies less
FRACTAL_MAPS = {16: 16, 32: 16, 64: 16, 128: 12, 256: 12, 512: 8, 1024: 6, 2048: 4, 4096: 3}
SMOOTH_MAPS = {16: 48, 32: 48, 64: 48, 128: 48, 256: 48, 512: 32, 1024: 24, 2048: 20, 4096: 12}
ELLIPSES = 3  # ellipses get 3x the maps: they are the short smooth boundaries that the few-edge bins rest on
MIN_BIN_SAMPLES = 64  # estimates per edge-pixel bin of the smooth null (its 0.5/99.5 percentiles need ~64)


@dataclass
class Options:
    resolutions: list[int] = field(default_factory=lambda: list(RESOLUTIONS))  # cells a side
    offsets: int = 8  # lattice placements per map (each an estimate: maps x offsets per row)
    out: str = str(CALIBRATION)
    markdown: str = str(RESULTS_DIR / "calibration.md")


def seed(*parts) -> np.random.SeedSequence:
    return np.random.SeedSequence([17, *parts])  # 17: the issue; tests draw fresh entropy, so they are held out


def measure(family: str, D: float, n: int, index: int, offsets: int) -> tuple[np.ndarray, int]:
    code = (FRACTAL_FAMILIES + SMOOTH_FAMILIES).index(family)
    m = phase_map(family, D, n, seed(code, round(D * 1000), n, index))
    est = lattice_estimates(m, offsets, np.random.default_rng(seed(code, round(D * 1000), n, index, 1)))
    return est["slopes"], est["edges"]


def summary(samples: np.ndarray, edges: list[int], pcts=(2.5, 50, 97.5)) -> dict:
    s = samples[np.isfinite(samples)]
    q = np.percentile(s, pcts) if s.size else [np.nan] * len(pcts)
    keys = {p: f"p{p:g}".replace(".", "_") for p in pcts}
    return dict(
        samples=int(s.size),
        mean=r4(s.mean()),
        std=r4(s.std()),
        **{keys[p]: r4(v) for p, v in zip(pcts, q)},
        edge_pixels=[int(min(edges)), int(np.median(edges)), int(max(edges))],
    )


def r4(x) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def edge_bins(edges: np.ndarray, per_map: int) -> list[list[int]]:
    """Powers-of-two bins of edge pixels, merged upwards until each holds >= MIN_BIN_SAMPLES estimates; the first
    starts at 0 and the last ends at 2^40, so every edge count has a bin."""
    bounds = [0]
    for b in range(1, 41):
        inside, rest = ((edges >= bounds[-1]) & (edges < 2**b)).sum(), (edges >= 2**b).sum()
        if min(inside, rest) * per_map >= MIN_BIN_SAMPLES:
            bounds.append(2**b)
    return [[a, b] for a, b in zip(bounds, bounds[1:] + [2**40])]


def calibrate(opts: Options, console: Console) -> tuple[list, list]:
    fractal, smooth = [], []
    for n in opts.resolutions:
        t0 = time.perf_counter()
        for family in FRACTAL_FAMILIES:
            for D in DIMENSIONS:
                runs = [measure(family, D, n, i, opts.offsets) for i in range(FRACTAL_MAPS[n])]
                row = summary(np.concatenate([s for s, _ in runs]), [e for _, e in runs])
                fractal.append(dict(family=family, dimension=D, resolution=n, maps=len(runs), **row))
        pooled, pooled_edges = [], []
        for family in SMOOTH_FAMILIES:
            maps = SMOOTH_MAPS[n] * (ELLIPSES if family == "ellipse" else 1)
            runs = [measure(family, 1.0, n, i, opts.offsets) for i in range(maps)]
            samples, edges = np.concatenate([s for s, _ in runs]), [e for _, e in runs]
            smooth.append(
                dict(
                    family=family,
                    resolution=n,
                    edge_bin=None,
                    maps=maps,
                    **summary(samples, edges, (0.5, 2.5, 50, 97.5, 99.5)),
                )
            )
            pooled += [s for s, _ in runs]
            pooled_edges += edges
        per_map, edges = np.stack(pooled), np.array(pooled_edges)
        smooth.append(
            dict(
                family="all",
                resolution=n,
                edge_bin=None,
                maps=len(edges),
                **summary(per_map.ravel(), list(edges), (0.5, 2.5, 50, 97.5, 99.5)),
            )
        )
        for lo, hi in edge_bins(edges, opts.offsets):
            inside = (edges >= lo) & (edges < hi)
            smooth.append(
                dict(
                    family="all",
                    resolution=n,
                    edge_bin=[lo, hi],
                    maps=int(inside.sum()),
                    **summary(per_map[inside].ravel(), list(edges[inside]), (0.5, 2.5, 50, 97.5, 99.5)),
                )
            )
        console.print(f"{n:5d}^2: {time.perf_counter() - t0:6.1f} s")
    return fractal, smooth


def cell(row: dict) -> str:
    return f"{row['p50']:.2f} ({row['p2_5']:.2f}-{row['p97_5']:.2f})"


def span(row: dict) -> str:
    return f"{row['p0_5']:.3f}-{row['p99_5']:.3f}"


def null_for(table: dict, n: int, edges: int) -> dict:
    bins = [r for r in table["smooth"] if r["resolution"] == n and r["edge_bin"] is not None]
    return next(r for r in bins if r["edge_bin"][0] <= edges < r["edge_bin"][1])


def markdown(table: dict) -> str:
    res, fam = table["resolutions"], FRACTAL_FAMILIES
    rows = {(r["family"], r["dimension"], r["resolution"]): r for r in table["fractal"]}
    smooth = {(r["family"], r["resolution"]): r for r in table["smooth"] if r["edge_bin"] is None}
    cols = " | ".join(f"{n}^2" for n in res)
    rule = "|" + " --- |" * (len(res) + 1) + "\n"
    text = [
        "# Calibration of the box-counting dimension\n\n",
        table["about"],
        "\n\nCost: ",
        table["cost"]["note"],
        ". Written by `benchmarks/calibrate_dimension.py`; the table itself is `fractal_vmap/analysis/"
        "calibration.json`.\n\n## Headline: median estimate (2.5-97.5 percentile) against true D\n\n",
    ]
    head = [n for n in (256, 1024) if n in res]
    text.append(
        "| true D | "
        + " | ".join(f"{f} {n}^2" for n in head for f in fam)
        + " |\n|"
        + " --- |" * (1 + len(head) * len(fam))
        + "\n"
    )
    for D in table["dimensions"]:
        text.append(f"| {D} | " + " | ".join(cell(rows[f, D, n]) for n in head for f in fam) + " |\n")
    text.append("\n## Smooth null (D = 1): 0.5-99.5 percentile of the estimate\n\n| family | " + cols + " |\n" + rule)
    for f in ("all",) + SMOOTH_FAMILIES:
        text.append(f"| {f} | " + " | ".join(span(smooth[f, n]) for n in res) + " |\n")
    text.append(
        "\nBy edge pixels (what `calibrated_dimension` compares with): bins [lo, hi) of at least "
        f"{MIN_BIN_SAMPLES} estimates.\n\n| resolution | edge pixels: 0.5-99.5 percentile (estimates) |\n"
        "| --- | --- |\n"
    )
    for n in res:
        bins = [r for r in table["smooth"] if r["resolution"] == n and r["edge_bin"] is not None]
        ends = [(b["edge_bin"][0], b["edge_bin"][1] if b["edge_bin"][1] < 2**40 else "") for b in bins]
        parts = [f"{lo}-{hi}: {span(b)} ({b['samples']})" for (lo, hi), b in zip(ends, bins)]
        text.append(f"| {n}^2 | " + "; ".join(parts) + " |\n")
    text.append(
        "\n## Smallest true D read above the smooth null (its 2.5th percentile above the null's 99.5th at "
        "the family's edge pixels)\n\n| family | " + cols + " |\n" + rule
    )
    for f in fam:
        first = [
            next(
                (
                    D
                    for D in table["dimensions"]
                    if rows[f, D, n]["p2_5"] > null_for(table, n, rows[f, D, n]["edge_pixels"][1])["p99_5"]
                ),
                None,
            )
            for n in res
        ]
        text.append(f"| {f} | " + " | ".join("-" if D is None else str(D) for D in first) + " |\n")
    for f in fam:
        text.append(f"\n## {f}\n\n{' '.join(FRACTAL[f].__doc__.split())}\n\n| true D | " + cols + " |\n" + rule)
        for D in table["dimensions"]:
            text.append(f"| {D} | " + " | ".join(cell(rows[f, D, n]) for n in res) + " |\n")
        lo, hi = table["dimensions"][0], table["dimensions"][-1]
        text.append(
            f"| median edge pixels, D = {lo} - {hi} | "
            + " | ".join(f"{rows[f, lo, n]['edge_pixels'][1]}-{rows[f, hi, n]['edge_pixels'][1]}" for n in res)
            + " |\n"
        )
    return "".join(text)


def main() -> None:
    parser = ArgumentParser()
    parser.add_arguments(Options, dest="opts")
    opts = parser.parse_args().opts
    console = Console()
    own0 = own_seconds()
    with CpuWatch() as watch:
        fractal, smooth = calibrate(opts, console)
    seconds, own, cpu = watch.wall_s, own_seconds() - own0, cpu_model()
    note = (
        f"{seconds / 60:.1f} min wall, {own / 60:.1f} min CPU on {cpu}, while other processes used "
        f"{watch.foreign:.0%} of the cores (git {git_revision()})"
    )
    table = dict(
        about=(
            "Each row: the least-squares slope of log N(s) on log(1/s) (power-of-two boxes up to the short side "
            "/ 8: dimension.box_sizes) over maps x lattice placements, on n x n maps of one family and true D (a "
            "grid refined to 2^k + 1 cells a side has the sizes of 2^k, and reads against its row). "
            f"{opts.offsets} placements per map (the origin and random shifts)."
        ),
        resolutions=opts.resolutions,
        dimensions=DIMENSIONS,
        offsets=opts.offsets,
        sizes={str(n): box_sizes(n, n) for n in opts.resolutions},
        families={f: dict(kind="fractal", reference=FRACTAL[f].__doc__.split("\n")[0]) for f in FRACTAL_FAMILIES}
        | {f: dict(kind="smooth", dimension=1.0) for f in SMOOTH_FAMILIES},
        cost=dict(wall_s=round(seconds, 1), cpu_s=round(own, 1), cpu=cpu, foreign=round(watch.foreign, 3), note=note),
        fractal=fractal,
        smooth=smooth,
    )
    Path(opts.out).write_text(json.dumps(table, separators=(",", ":")) + "\n")
    Path(opts.markdown).write_text(markdown(table))
    console.print(f"wrote {opts.out} and {opts.markdown}: {note}")


if __name__ == "__main__":
    main()
