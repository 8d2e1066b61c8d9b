"""What a study found, from its run dirs only (so a rerun or a reader recomputes the same numbers): per level the
calibrated dimension (analysis/dimension.py, pooling the twins), the noise floor (twins.py) and the cells trained; the
rules of thumb (rules.py); written as study.json (every number), REPORT.md (tables and plain sentences) and
lr_star.png (the critical lr per token budget and its law)."""

import math
from pathlib import Path

import numpy as np

from fractal_vmap.analysis.compare import load_phase, ran_on
from fractal_vmap.analysis.dimension import calibrated_dimension
from fractal_vmap.analysis.runs import read_grid
from fractal_vmap.files import strict_json, write_atomic
from fractal_vmap.study import rules
from fractal_vmap.study.twins import noise_floor, twin_cells_trained


def axis_step(axis: dict) -> float:
    """An axis' mean step: in decades on a log axis, in its units on a linear one."""
    v = np.asarray(axis["values"], dtype=np.float64)
    return float(np.mean(np.diff(np.log10(v) if axis["scale"] == "log" else v)))


def level_result(level: dict) -> dict:
    """One level of the zoom chain: its axes, cells trained, calibrated dimension (twins pooled) and noise floor."""
    run_dir, twin_dirs = Path(level["run_dir"]), {k: Path(v) for k, v in level["twins"].items()}
    _, grid, measure = read_grid(str(run_dir))
    twins = [read_grid(str(d))[2] for d in twin_dirs.values()]
    axes = grid["spec"]["axes"]
    return dict(
        name=level["name"],
        box=level["box"],
        rows=dict(name=axes["rows"]["name"], range=[axes["rows"]["values"][0], axes["rows"]["values"][-1]]),
        cols=dict(name=axes["cols"]["name"], range=[axes["cols"]["values"][0], axes["cols"]["values"][-1]]),
        shape=list(measure.shape),
        trained=twin_cells_trained(run_dir),
        trainable_fraction=float(np.nanmean(measure < 0)),
        dimension=calibrated_dimension(measure, twins),
        noise=noise_floor(run_dir, twin_dirs),
    )


def phases_of(plane: dict) -> tuple[dict, list[np.ndarray]]:
    """A plane's grid.json and its phase maps, the map first, then its twins."""
    grid, phase, _ = load_phase(Path(plane["run_dir"]))
    return grid, [phase] + [load_phase(Path(d))[1] for d in plane["twins"].values()]


def plane_rule(level: dict) -> dict:
    """Which axis' learning rate sets trainability on the top map, and the safe region (rules.orientation/safe_box)."""
    grid, phases = phases_of(level)
    axes = grid["spec"]["axes"]
    steps = [axis_step(axes[k]) for k in ("rows", "cols")]
    each = [rules.orientation(p, *steps) for p in phases]
    angles = [o["angle"] for o in each if o is not None]
    box = rules.safe_box(phases)
    rows, cols = axes["rows"], axes["cols"]
    return dict(
        rows_axis=rows["name"],
        cols_axis=cols["name"],
        orientation=each[0],
        angle_range=[min(angles), max(angles)] if angles else None,
        safe_rows_max=None if box["rows"] is None else rows["values"][box["rows"]],
        safe_cols_max=None if box["cols"] is None else cols["values"][box["cols"]],
        safe_corner=None
        if box["corner"] is None
        else [rows["values"][box["corner"][0]], cols["values"][box["corner"][1]]],
        rows_range=[rows["values"][0], rows["values"][-1]],
        cols_range=[cols["values"][0], cols["values"][-1]],
    )


def tokens_rule(plane: dict) -> dict:
    """lr* per token budget, its law with a bootstrap interval, what the fit reads on a known law on this grid, and the
    safe lr as a fraction of lr*."""
    grid, phases = phases_of(plane)
    axes = grid["spec"]["axes"]
    rows = rules.critical_lrs(phases, axes["cols"]["values"], axes["rows"]["values"])
    law = rules.power_law(rows)
    known = (
        None
        if law is None
        else rules.known_case(axes["cols"]["values"], axes["rows"]["values"], law["B"], law["beta"], len(phases) - 1)
    )
    fractions = [r["safe_fraction"] for r in rows if r["censored"] is None]
    return dict(
        rows=rows,
        law=law,
        known_case=known,
        safe_fraction=min(fractions) if fractions else None,
        trained=twin_cells_trained(Path(plane["run_dir"])),
        twins_trained={k: twin_cells_trained(Path(d)) for k, d in plane["twins"].items()},
    )


def g(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def span(pair, digits: int = 3) -> str:
    return "n/a" if pair is None else f"{g(pair[0], digits)}-{g(pair[1], digits)}"


def findings(results: dict) -> list[str]:
    """The answer in plain sentences, with its numbers and intervals."""
    out = []
    for lv in results["levels"]:
        d = lv["dimension"]
        interval = "no interval" if d["interval"] is None else f"interval {span(d['interval'])}"
        null = "" if d["null"] is None else f", smooth null {span(d['null']['range'])}"
        corr = d["corrected"] or {}
        fixed = "" if not corr.get("dimension") else f", bias-corrected D {g(corr['dimension'])}"
        sig, twins = lv["noise"]["signal_fraction"], lv["noise"]["twins"]
        signal = f"{g(sig, 2)} of its edge pixels are signal (every twin has them)" if twins else "no twins"
        out.append(
            f"{lv['name']} ({lv['shape'][0]} x {lv['shape'][1]}, {lv['trained']} cells trained): D {g(d['dimension'])} "
            f"({interval}{null}{fixed}) from {d['edge_pixel_count']} edge pixels: {d['verdict']}; {signal}"
        )
    verdicts = [lv["dimension"]["verdict"] for lv in results["levels"]]
    deep = sum(v == "fractal" for v in verdicts)
    out.append(f"the boundary reads fractal at {deep} of {len(verdicts)} level(s) ({', '.join(verdicts)})")
    p = results.get("plane")
    if p and p["orientation"]:
        o = p["orientation"]
        who = p["rows_axis"] if o["rows_share"] > 2 / 3 else p["cols_axis"] if o["rows_share"] < 1 / 3 else "both"
        spread = "" if not p["angle_range"] else f" ({span(p['angle_range'])} over the map and its twins)"
        out.append(
            f"on {p['rows_axis']} x {p['cols_axis']}, {who} set(s) trainability: the boundary's normal lies "
            f"{g(o['angle'])} degrees from the {p['rows_axis']} axis{spread}, {g(100 * o['rows_share'], 2)}% of it "
            f"along {p['rows_axis']}"
        )
        safe = []
        if p["safe_rows_max"] is not None:
            safe.append(
                f"{p['rows_axis']} <= {g(p['safe_rows_max'])} trains at every {p['cols_axis']} in "
                f"{span(p['cols_range'])}"
            )
        if p["safe_cols_max"] is not None:
            safe.append(
                f"{p['cols_axis']} <= {g(p['safe_cols_max'])} trains at every {p['rows_axis']} in "
                f"{span(p['rows_range'])}"
            )
        if p["safe_corner"] is not None:
            safe.append(
                f"every cell with {p['rows_axis']} <= {g(p['safe_corner'][0])} and {p['cols_axis']} <= "
                f"{g(p['safe_corner'][1])} trained (the largest such corner of the map)"
            )
        out.append(
            "safe region (map and twins): "
            + ("; ".join(safe) if safe else "no leading stretch of either axis trains everywhere")
        )
    t = results.get("tokens")
    if t:
        law = t["law"]
        if law is None:
            out.append("lr*(tokens): fewer than 3 token budgets have a critical lr inside the grid: no law")
        else:
            k = t["known_case"]
            f2 = lambda x: f"{x:.2f}"  # noqa: E731  (beta near 0 in general notation reads -1.23e-16)
            check = (
                ""
                if k is None
                else (
                    f"; on a known law of this beta on the same grid the fit reads {f2(k['beta'])} "
                    f"({f2(k['beta_interval'][0])} to {f2(k['beta_interval'][1])})"
                )
            )
            out.append(
                f"lr*(tokens) = {g(law['B'])} x tokens^(-beta), beta = {f2(law['beta'])}, 95% interval "
                f"{f2(law['beta_interval'][0])} to {f2(law['beta_interval'][1])}, from {law['rows_used']} token "
                f"budgets {span(law['tokens_range'], 5)}{check}"
            )
        if t["safe_fraction"] is not None:
            out.append(
                f"safe lr: every cell of every row and twin trained below {g(t['safe_fraction'], 2)} x lr*(tokens)"
            )
    return out


def ran_with(run_dir: Path, column: str) -> str:
    """The device(s) or torch thread count(s) the map's cells trained with (cells.parquet's columns)."""
    import pandas as pd

    return ", ".join(str(v) for v in ran_on(pd.read_parquet(Path(run_dir) / "cells.parquet"), column))


def analyse(s, study_dir: Path, levels: list[dict], tokens: dict | None, ran: dict) -> dict:
    """Every number of the study from its run dirs, and the findings in sentences."""
    results = dict(
        task=s.cfg.task,
        settings=dict(
            coarse=s.coarse, refine=s.refine, side=s.side, zooms=s.zooms, num_tokens=s.num_tokens, twins=s.twins
        ),
        levels=[level_result(lv) for lv in levels],
        plane=plane_rule(levels[0]),
        tokens=None if tokens is None else tokens_rule(tokens),
        ran=dict(
            ran,
            threads=ran_with(levels[0]["run_dir"], "threads"),
            device=ran_with(levels[0]["run_dir"], "device"),
            cells_trained=sum(x["cells_trained"] for x in ran["grids"]),
            lane_steps=sum(x["lane_steps"] for x in ran["grids"]),
        ),
    )
    results["findings"] = findings(results)
    return results


def lr_star_figure(tokens: dict, path: Path) -> None:
    """lr* per token budget with its bracket, and the fitted law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in tokens["rows"] if r["censored"] is None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if rows:
        t = np.array([r["tokens"] for r in rows])
        y = np.array([r["lr_star"] for r in rows])
        lo, hi = np.array([r["bracket"][0] for r in rows]), np.array([r["bracket"][1] for r in rows])
        ax.errorbar(t, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, label="lr* (bracket: grid step + twins)")
    law = tokens["law"]
    if law:
        x = np.geomspace(*law["tokens_range"], 50)
        ax.plot(x, law["B"] * x ** -law["beta"], label=f"{law['B']:.3g} t^-{law['beta']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="num_tokens", ylabel="critical lr")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def level_row(lv: dict) -> str:
    """A level's line of REPORT.md's table."""
    d, n = lv["dimension"], lv["noise"]
    flips = [
        f"{k}: {v['flipped']} ({v['flipped_on_boundary']} on the boundary; {v['trained']} trained)"
        for k, v in n["twins"].items()
    ]
    c = d["corrected"] or {}
    corrected = f"{g(c['dimension'])} ({span(c.get('interval'))})" if c.get("dimension") else c.get("note") or "n/a"
    known = c.get("known_reads") or {}
    medians = [k["reads"][1] for k in known.values() if k["reads"][1] is not None]
    reads = span([min(medians), max(medians)]) if medians else "n/a"  # a known boundary of the corrected D, here
    H, W = lv["shape"]
    null = None if d["null"] is None else d["null"]["range"]
    return table_row(
        [
            f"{lv['name']} {H}x{W}",
            f"{H * W} ({lv['trained']})",
            g(d["dimension"]),
            span(d["interval"]),
            span(null),
            corrected,
            reads,
            d["verdict"],
            ", ".join(flips) or "no twins",
            f"{n['signal']}/{n['edge_pixels']}",
        ]
    )


def token_row(r: dict) -> str:
    if r["censored"]:
        return table_row([g(r["tokens"], 5), r["censored"], "", "", "", "", ""])
    return table_row(
        [
            g(r["tokens"], 5),
            g(r["last_trainable"]),
            g(r["first_untrainable"]),
            g(r["lr_star"]),
            span(r["bracket"]),
            "none" if r["mixed_band"] is None else span(r["mixed_band"]),
            f"{g(r['safe_lr'])} ({g(r['safe_fraction'], 2)})",
        ]
    )


def markdown(results: dict) -> str:
    lines = ["# Study report", "", f"Task {results['task']}; `{results['ran']['command']}`", "", "## Findings", ""]
    lines += [f"- {f}" for f in results["findings"]]
    head = ["level", "cells (trained)", "D raw", "interval", "smooth null", "corrected D", "known D reads", "verdict"]
    head += ["flips", "signal"]
    lines += ["", "## Levels", "", table_row(head), table_row(["---"] * len(head))]
    lines += [level_row(lv) for lv in results["levels"]]
    chain = ", the zoom chain: `zoom.gif`" if len(results["levels"]) > 1 else ""
    lines += [
        "",
        "D raw: box counting (fractal.py); interval: 2.5-97.5 percentile over lattice placements and the twins; smooth "
        "null: what smooth boundaries read here (0.5-99.5 percentile); corrected D: the calibration table's inversion "
        "(analysis/dimension.py); known D reads: the median reading of calibrated boundaries of that D at this "
        "resolution, over the families; flips: cells whose label a twin changes; signal: edge pixels every twin "
        "shares.",
        "",
        f"Each level's pictures: `<level>/trainability.png`, `<level>/panels.png`{chain}.",
        "",
    ]
    t = results["tokens"]
    if t:
        head = ["tokens", "last trainable", "first untrainable", "lr*", "bracket", "mixed band", "safe lr (x lr*)"]
        lines += ["## Critical learning rate per token budget", "", "![lr*](lr_star.png)", ""]
        lines += [table_row(head), table_row(["---"] * len(head))] + [token_row(r) for r in t["rows"]] + [""]
    ran = results["ran"]
    lines += [
        "## What was run",
        "",
        f"{ran['cells_trained']} cells trained in all ({ran['lane_steps']} lane-steps); this invocation's wall time "
        f"{ran['wall_seconds']:.0f} s; torch threads {ran['threads']}, device {ran['device']}.",
        "",
        table_row(["grid", "what", "cells trained", "lane-steps", "train seconds (its unit files)"]),
        table_row(["---"] * 5),
    ]
    lines += [
        table_row([x["run_dir"], x["kind"], str(x["cells_trained"]), str(x["lane_steps"]), f"{x['train_seconds']:.1f}"])
        for x in ran["grids"]
    ]
    return "\n".join(lines) + "\n"


def write(study_dir: Path, results: dict) -> None:
    write_atomic(study_dir / "study.json", strict_json(results))
    if results["tokens"]:
        lr_star_figure(results["tokens"], study_dir / "lr_star.png")
    write_atomic(study_dir / "REPORT.md", markdown(results))
