"""A run's labels from its loss curve, one definition for every trainer and task (the reference trainer, nanochat
lanes, the paper's MLP, `plot`'s relabelling): stable, trainable (stored as `converged`), the numbers they rest on,
and the paper's convergence measure (Sohl-Dickstein 2024), whose sign is the phase. Numpy only.

Sign convention used everywhere: measure < 0 means the run trained, measure > 0 means it did not.
"""

import numpy as np

MAX_VAL = 1e6  # cap on normalised losses, and the value given to non-finite ones (the paper's choice)
CHUNK = 1 << 16  # runs labelled at once: [CHUNK, steps] float64 temporaries (52 MB at 100 steps)


def convergence_measure(losses, window: int = 20, threshold: float = 1.0) -> np.ndarray:
    """
    The paper's convergence measure, vectorised over leading dims: losses [..., steps] -> [...].
    v = losses / losses[..., :1], with non-finite entries and entries above 1e6 set to 1e6
    (a non-finite or non-positive first loss makes the whole v equal to 1e6: diverged).
    If mean(v[..., -window:]) < threshold the run trained and the measure is -sum(v) (negative);
    otherwise it did not and the measure is sum(1/v) (positive).
    So: measure < 0 is trained, measure > 0 is not, and |measure| grows towards the boundary
    (slow training gives a large sum(v), slow divergence a large sum(1/v)).
    """
    # contiguous: numpy sums a strided axis in another order than a contiguous one (the last bit differs), and a run's
    # measure must not depend on how its caller laid the curves out
    x = np.ascontiguousarray(losses, dtype=np.float64)
    assert x.ndim >= 1 and x.shape[-1] >= 1, f"losses must have shape [..., steps>=1], got {x.shape}"
    first = x[..., :1]
    with np.errstate(all="ignore"):
        v = x / first
    first_ok = np.isfinite(first) & (first > 0)
    v = np.where(first_ok, v, MAX_VAL)
    v = np.where(np.isfinite(v) & (v <= MAX_VAL), v, MAX_VAL)
    trained = v[..., -window:].mean(axis=-1) < threshold  # the rule of label_runs' `converged`
    trained_value = -v.sum(axis=-1)
    diverged_value = (1.0 / np.maximum(v, 1.0 / MAX_VAL)).sum(axis=-1)  # floor keeps a zero loss from giving inf
    return np.where(trained, trained_value, diverged_value)


def label_runs(curves, steps, window: int = 20, threshold: float = 1.0) -> dict[str, np.ndarray]:
    """
    Labels of L runs: run i's curve is curves[i, :steps[i]] (the loss before each step; entries beyond are ignored).
    Its run is that curve up to and including its first non-finite loss (a non-finite loss ends a run).
    Returns arrays [L]:
      stable: every loss of the run is finite (and there is at least one)
      converged: stable and trainable_ratio < threshold (the trainable label)
      trainable_loss0: the first loss
      trainable_mean_last_k: mean of the last min(window, run length) losses of the run (a diverged run's includes
        its non-finite loss, so it is not finite)
      trainable_ratio: trainable_mean_last_k / trainable_loss0
      measure: convergence_measure of the curve, NaN after the run (a run that stopped early is diverged for it)
      final_loss: the run's last loss; avg_loss: the mean of its finite losses; steps: its length
    """
    x = np.asarray(curves, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    assert x.ndim == 2 and x.shape[0] == steps.shape[0] and (steps <= x.shape[1]).all(), (x.shape, steps.shape)
    if x.shape[1] == 0:  # runs of no step: one NaN column, outside every run
        x = np.full((x.shape[0], 1), np.nan)
    parts = [
        _label_chunk(x[i : i + CHUNK], steps[i : i + CHUNK], window, threshold) for i in range(0, len(steps), CHUNK)
    ]
    if not parts:  # no run at all
        return _label_chunk(x, steps, window, threshold)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _label_chunk(x: np.ndarray, steps: np.ndarray, window: int, threshold: float) -> dict[str, np.ndarray]:
    assert window >= 1, f"window must be >= 1, got {window}"
    L, T = x.shape
    cols = np.arange(T)[None, :]
    inside = cols < steps[:, None]
    bad = inside & ~np.isfinite(x)
    stopped = bad.any(axis=1)
    length = np.where(stopped, bad.argmax(axis=1) + 1, steps)  # through the first non-finite loss
    run = cols < length[:, None]
    k = np.minimum(window, length)
    last = run & (cols >= (length - k)[:, None])
    finite = run & np.isfinite(x)
    with np.errstate(all="ignore"):  # inf - inf, x / 0: nan or inf, which is what a diverged run reports
        loss0 = np.where(length > 0, x[:, 0], np.nan)
        mean_last = np.where(last, x, 0.0).sum(axis=1) / k
        ratio = mean_last / loss0
        avg = np.where(finite, x, 0.0).sum(axis=1) / finite.sum(axis=1)
    stable = ~stopped & (length > 0)
    final = x[np.arange(L), np.maximum(length - 1, 0)]
    padded = np.where(run, x, np.nan)
    measure = np.full(L, np.nan)
    for s in np.unique(steps[steps > 0]):  # the measure sums over a run's own steps
        sel = steps == s
        measure[sel] = convergence_measure(padded[sel, :s], window, threshold)
    return {
        "stable": stable,
        "converged": stable & (ratio < threshold),
        "trainable_loss0": loss0,
        "trainable_mean_last_k": mean_last,
        "trainable_ratio": ratio,
        "measure": measure,
        "final_loss": np.where(length > 0, final, np.nan),
        "avg_loss": avg,
        "steps": length,
    }


def label_run(losses, steps: int | None = None, window: int = 20, threshold: float = 1.0) -> dict:
    """label_runs of one run (its losses, `steps` long, default their length) as JSON-friendly Python values, with
    the run's losses (cut at its first non-finite one) under `losses`."""
    x = np.asarray(losses, dtype=np.float64).reshape(-1)
    steps = len(x) if steps is None else steps
    curve = np.full(max(steps, len(x)), np.nan)
    curve[: len(x)] = x
    labels = {k: v[0].item() for k, v in label_runs(curve[None], [steps], window, threshold).items()}
    labels["losses"] = curve[: labels["steps"]].tolist()
    return labels


def trainability(losses, window: int = 20, threshold: float = 1.0) -> dict:
    """The trainability labels of one run from its loss curve (label_runs' stable, converged, trainable_loss0,
    trainable_mean_last_k, trainable_ratio), as JSON-friendly Python values."""
    labels = label_run(losses, None, window, threshold)
    return {
        k: labels[k] for k in ("stable", "converged", "trainable_loss0", "trainable_mean_last_k", "trainable_ratio")
    }
