"""The paper's task: a one-hidden-layer MLP trained by full-batch gradient descent (Sohl-Dickstein 2024,
"The boundary of neural network trainability is fractal", arXiv 2402.06184), many copies ("lanes") at once.

Network (mean-field parameterization, as the paper's notebook writes it): input dim n = width, hidden width n,
output dim 1; W0 [n, n], W1 [n, 1], every weight, input and target drawn N(0, 1);
    z = x @ W0 / sqrt(n);  h = act(z);  out = h @ W1 / sqrt(n) / sqrt(n)   (the output layer is h @ W1 / n in total)
act: tanh(sqrt(2) z), sqrt(2) relu(z), or identity. Loss: mean squared error over the whole training set.
Training points: number of parameters x data_multiple (the identity network: width x data_multiple).
Training: full-batch gradient descent with one learning rate per layer (lr0 for W0, lr1 for W1); the loss is
recorded before each update.

Phase spaces (the paper's two):
  lr_vs_lr: columns = layer-0 (input layer) lr, rows = layer-1 (output layer) lr; the notebook's default view is
    log10 lr in [-3, 6] on both axes (DEFAULT_VIEW).
  offset_vs_lr: columns = an offset added to every initial weight of layer 0 (the "input layer weight offset"),
    rows = one learning rate shared by both layers. The offset is added once, to the initial W0. (The published
    notebook adds it inside its train step, so there W0 drifts by the offset at every step; we follow the paper's
    description, a shift of the initialization.)

Two ways to get a lane's loss and gradients, same signature (params, x, y, cfg) -> (loss [L], grads):
  vmap_loss_and_grads: torch.func.vmap(grad_and_value(loss)) of the plain one-network `loss` (what a generic lane
    engine does; the reference);
  lane_loss_and_grads: the same gradients derived by hand for stacked lanes (faster on CPU; both are tested
    against gradients derived by hand in numpy).
"""

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from fractal_vmap.errors import UserError
from fractal_vmap.lanes import Row, padded_lanes, run

ACTIVATIONS = ("tanh", "relu", "identity")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
PHASE_SPACES = ("lr_vs_lr", "offset_vs_lr")
DEFAULT_VIEW = (-3.0, 6.0)  # log10 lr range of both axes in the notebook's first picture
VEC_BYTES = 128  # bytes per step of torch's vectorized CPU loops: 2 AVX-512 vectors (AVX2's 64 divide it)
GRAIN = 32768  # ATen's parallel grain size: an elementwise op on fewer elements runs on the calling thread alone
COMPACT_EVERY = 10  # steps between dropping the lanes that stopped (17% of a default grid's lane-steps)
LANE_CHUNK = 256  # lanes trained together on CPU: their [lanes, width, points] activations (1.2 MB) stay in cache

# (params, x, y, cfg) -> (loss [L], grads {name: [L, ...]}) for stacked params {name: [L, ...]}
LossAndGrads = Callable[
    [dict[str, torch.Tensor], torch.Tensor, torch.Tensor, "PaperConfig"], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


@dataclass
class PaperConfig:
    """The paper's MLP task: everything shared by the lanes of one grid."""

    width: int = 8  # n: input dim and hidden width (the paper used 16)
    activation: str = "tanh"  # tanh (tanh(sqrt(2) z)), relu (sqrt(2) relu(z)) or identity
    steps: int = 100  # full-batch gradient descent steps (the paper: 500 to 1000)
    data_multiple: float = 1.0  # training points = parameters x this (identity network: width x this)
    dtype: str = "float64"  # float64 or float32
    seed: int = 0  # draws the initial weights and the data
    perturb_ulp: int = 0  # nudge every initial weight up by this many ulps of its dtype (the map's 1-ulp twin)


def check_config(cfg: PaperConfig) -> None:
    """Bad settings fail here, in one line, before any work."""
    if cfg.activation not in ACTIVATIONS:
        raise UserError(f"unknown activation {cfg.activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown dtype {cfg.dtype!r} for the paper task: use one of {', '.join(DTYPES)}")
    if cfg.perturb_ulp < 0:
        raise UserError(f"--perturb_ulp is {cfg.perturb_ulp}: use 0 (no nudge) or a positive number of ulps")
    if cfg.width < 1 or cfg.steps < 1:
        raise UserError(f"width and steps must be >= 1, got width={cfg.width} steps={cfg.steps}")
    if num_points(cfg) < 1:
        raise UserError(f"data_multiple={cfg.data_multiple} gives no training points: use a larger multiple")


def num_params(cfg: PaperConfig) -> int:
    return cfg.width * cfg.width + cfg.width


def num_points(cfg: PaperConfig) -> int:
    """Training set size, as the notebook counts it (the identity network's data is counted in widths)."""
    base = cfg.width if cfg.activation == "identity" else num_params(cfg)
    return int(base * cfg.data_multiple)


def init_params(cfg: PaperConfig) -> dict[str, torch.Tensor]:
    """W0 [n, n] and W1 [n, 1], N(0, 1), drawn by numpy from the seed (so any engine can draw the same)."""
    rng = np.random.default_rng([cfg.seed, 0])  # stream 0 of the seed: weights
    n, dtype = cfg.width, DTYPES[cfg.dtype]
    W0 = rng.standard_normal((n, n))
    W1 = rng.standard_normal((n, 1))
    params = {"W0": torch.from_numpy(W0).to(dtype), "W1": torch.from_numpy(W1).to(dtype)}
    for _ in range(cfg.perturb_ulp):  # one representable float up (towards +inf) per ulp
        params = {k: torch.nextafter(v, torch.full_like(v, torch.inf)) for k, v in params.items()}
    return params


def make_data(cfg: PaperConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x [N, n] and targets y [N, 1], N(0, 1), drawn by numpy from the seed."""
    rng = np.random.default_rng([cfg.seed, 1])  # stream 1 of the seed: data
    N, dtype = num_points(cfg), DTYPES[cfg.dtype]
    x = rng.standard_normal((N, cfg.width))
    y = rng.standard_normal((N, 1))
    return torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)


def act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "tanh":
        return torch.tanh(math.sqrt(2) * z)
    if activation == "relu":
        return math.sqrt(2) * torch.relu(z)
    assert activation == "identity", activation
    return z


def forward(params: dict[str, torch.Tensor], x: torch.Tensor, cfg: PaperConfig) -> torch.Tensor:
    """One network: x [N, n] -> out [N, 1]. Each layer divides by sqrt(fan_in); the output once more."""
    W0, W1 = params["W0"], params["W1"]
    h = act(x @ W0 / math.sqrt(W0.shape[0]), cfg.activation)
    return h @ W1 / math.sqrt(W1.shape[0]) / math.sqrt(W1.shape[0])


def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: PaperConfig) -> torch.Tensor:
    """Mean squared error of ONE network: a scalar. Pure, so torch.func.vmap can map it over stacked params."""
    return ((forward(params, x, cfg) - y) ** 2).mean()


def vmap_loss_and_grads(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: PaperConfig):
    """Per-lane loss [L] and gradients of stacked params, by torch.func.vmap(grad_and_value(loss))."""
    grads, losses = vmap(grad_and_value(loss), in_dims=(0, None, None, None))(params, x, y, cfg)
    return losses, grads


def sigmoid_(t: torch.Tensor) -> torch.Tensor:
    """t.sigmoid_() with every element of a contiguous CPU tensor through torch's vectorized code.

    torch computes an elementwise op in whole vectors and the leftover elements of each thread's range with a scalar
    formula, and for sigmoid the two round differently (2.6% of float64 inputs differ in the last bit). Which
    elements are left over depends on the tensor's size, so a lane's numbers would depend on how many lanes run
    beside it. Here every call covers whole vectors: the body in pieces just under GRAIN elements (so each runs on
    one thread, in one range), and the last partial vector inside a zero-padded full one."""
    if t.device.type != "cpu":  # CUDA kernels compute every element with the same code
        return t.sigmoid_()
    assert t.is_contiguous(), "sigmoid_ works on the memory of a contiguous tensor"
    block = VEC_BYTES // t.element_size()
    flat = t.view(-1)
    n = flat.numel()
    body = n - n % block
    for piece in flat[:body].split(GRAIN - block):
        piece.sigmoid_()
    if body < n:
        tail = torch.zeros(block, dtype=t.dtype)
        tail[: n - body] = flat[body:]
        flat[body:] = tail.sigmoid_()[: n - body]
    return t


def lane_loss_and_grads(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: PaperConfig):
    """Per-lane loss [L] and gradients of stacked params W0 [L, n, n], W1 [L, n, 1], derived by hand.

    Activations live as [L, n, N] (hidden unit, then training point). Every product is a batched matrix product
    (bmm) with one small product per lane, the shared x broadcast over the lanes, so a lane's numbers cannot depend
    on how many lanes run beside it (one big product with the lanes side by side in the columns is faster on CPU,
    but MKL rounds a column differently with the matrix width and the column's place). tanh(u) is computed as
    2 sigmoid(2u) - 1 (sigmoid_ above): on one core of the AMD EPYC here torch's float64 tanh costs ~4.3 ns an
    element, sigmoid ~0.6 ns, and the two agree within 3.4e-16 (measured over u in [-40, 40]). The elementwise ops are
    single-rounding ones (no fused multiply-adds, whose vector and scalar paths could round differently)."""
    W0, W1 = params["W0"], params["W1"]
    L, n, N = W0.shape[0], W0.shape[1], x.shape[0]
    # a = (c x) @ W0 is the activation's argument: c folds 1/sqrt(n), the activation's sqrt(2), and tanh's 2u
    c = {"tanh": 2 * math.sqrt(2 / n), "relu": math.sqrt(2 / n), "identity": 1 / math.sqrt(n)}[cfg.activation]
    xc = x * c
    a = torch.bmm(W0.mT, xc.T.expand(L, n, N))  # a[l, j, m]: hidden unit j of lane l on point m
    if cfg.activation == "tanh":
        h = sigmoid_(a).mul_(2).sub_(1)
    elif cfg.activation == "relu":
        h = a.relu_()
    else:
        h = a
    w1 = W1.view(L, 1, n) / n  # the output layer's 1/sqrt(n), twice
    r = torch.bmm(w1, h).view(L, N) - y.view(1, N)  # residuals
    losses = (r * r).mean(1)
    dout = r.mul_(2 / N)[:, None, :]  # d loss / d out [L, 1, N]
    gW1 = (h * dout).sum(-1) / n
    if cfg.activation == "tanh":  # d/da (2 sigmoid(a) - 1) = (1 - h^2) / 2
        da = ((w1 * 0.5).view(L, n, 1) * dout).mul_(1 - h * h)
    elif cfg.activation == "relu":
        da = (w1.view(L, n, 1) * dout).mul_(h > 0)
    else:
        da = w1.view(L, n, 1) * dout
    gW0 = torch.bmm(da, xc.expand(L, N, n)).mT  # [L, n_in, n_hidden], a transposed view
    return losses, {"W0": gW0, "W1": gW1.view(L, n, 1)}


def gd_update(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lrs: dict[str, torch.Tensor], active: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One gradient descent step of stacked params, each lane with its own lr per layer (lrs[name]: [L]).
    Lanes where active [L] is False keep their params exactly (even if their gradients are NaN)."""
    out = {}
    for k, p in params.items():
        shape = (-1,) + (1,) * (p.dim() - 1)
        lr = lrs[k].to(p.dtype).view(shape)
        out[k] = torch.where(active.view(shape), p - lr * grads[k], p)
    return out


class PaperLanes:
    """A chunk of the paper's networks as the engine's lane model (lanes.LaneModel): stacked W0 [L, n, n] and W1
    [L, n, 1] from the same initial weights (plus each lane's W0 offset), full-batch gradient descent with each lane's
    lr per layer. `losses` computes the losses and the gradients together (`loss_and_grads`); `update` applies them
    to the active lanes."""

    log_dtype = torch.float64

    def __init__(
        self,
        cfg: PaperConfig,
        base: dict[str, torch.Tensor],
        lr0: torch.Tensor,
        lr1: torch.Tensor,
        offset: torch.Tensor,
        loss_and_grads: LossAndGrads,
    ):
        L = lr0.shape[0]
        self.cfg, self.loss_and_grads = cfg, loss_and_grads
        self.params = {k: v.expand(L, *v.shape).clone() for k, v in base.items()}
        self.params["W0"] += offset.to(self.params["W0"].dtype).view(L, 1, 1)
        self.lrs = {"W0": lr0, "W1": lr1}

    def losses(self, step: int, inputs: torch.Tensor, targets: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        losses, self.grads = self.loss_and_grads(self.params, inputs, targets, self.cfg)
        return losses

    def update(self, step: int, losses: torch.Tensor, active: torch.Tensor) -> None:
        self.params = gd_update(self.params, self.grads, self.lrs, active)

    def select(self, index: torch.Tensor) -> None:
        self.params = {k: v[index] for k, v in self.params.items()}
        self.lrs = {k: v[index] for k, v in self.lrs.items()}

    def supervised(self, targets: torch.Tensor) -> int:
        return targets.shape[0]  # training points: every lane sees the whole set every step

    def lane_counts(self, alive: int) -> int:
        return padded_lanes(alive)


def train_chunk(
    cfg: PaperConfig,
    base: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    offset: torch.Tensor,
    loss_and_grads: LossAndGrads,
) -> torch.Tensor:
    """Losses [steps, n] of one chunk of n lanes, trained on the lane engine (a lone lane beside an idle one; the lanes
    that stopped dropped every COMPACT_EVERY steps: lanes.run)."""
    n = lr0.shape[0]
    L = padded_lanes(n)
    pad = lambda t: torch.cat([t, t[-1:].expand(L - n)])  # noqa: E731  (the idle lane copies the last one's settings)
    model = PaperLanes(cfg, base, pad(lr0), pad(lr1), pad(offset), loss_and_grads)
    total = torch.tensor([cfg.steps] * n + [0] * (L - n), dtype=torch.int64, device=x.device)
    row = Row(model, total, real=n, max_steps=cfg.steps)
    run(row, lambda step: (x, y), sync_every=COMPACT_EVERY)
    return row.loss_log[:, :n].cpu()


def train_paper_lanes(
    cfg: PaperConfig,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    offset: torch.Tensor | None = None,
    chunk: int = LANE_CHUNK,
    loss_and_grads: LossAndGrads = lane_loss_and_grads,
    device: torch.device | str = "cpu",
    workers: int = 0,
    on_chunk: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Train L networks from the same initial weights and data, lane i with lr0[i] on W0 and lr1[i] on W1 and
    offset[i] (default 0) added to its initial W0. Returns the losses [steps, L] (float64, on the CPU), each
    recorded before its update; after a lane's first non-finite loss, its entries are NaN. No host sync inside
    the step loop: the losses stay on the device until a chunk ends.

    Lanes run in chunks of `chunk` (on a GPU, pass the lane count: one chunk), each a row of the lane engine; a
    chunk of one lane runs beside an idle one, because a single lane takes matrix-vector kernels that round
    differently (lanes.MIN_LANES): a lane's numbers never depend on its chunk. On CPU the chunks run side by side on
    `workers` threads (0: torch's intra-op thread count), every op on one thread (intra-op threads set to 1 meanwhile,
    then restored): this network's ops last tens of microseconds, too short for OpenMP's fork and join, and while
    another process holds a core an OpenMP team waits for its descheduled member at every op (on 2 busy shared cores: 2
    OpenMP threads ran 17x slower than one thread, 2 chunk threads 2x faster than one). `on_chunk(start, lanes)` is
    called as each chunk's losses are in, in order, on the calling thread (a progress view)."""
    check_config(cfg)
    lr0, lr1 = (
        torch.as_tensor(lr0, dtype=torch.float64).reshape(-1),
        torch.as_tensor(lr1, dtype=torch.float64).reshape(-1),
    )
    offset = torch.zeros_like(lr0) if offset is None else torch.as_tensor(offset, dtype=torch.float64).reshape(-1)
    if not (lr0.shape == lr1.shape == offset.shape):
        raise ValueError(
            f"lr0, lr1 and offset must have one entry per lane, got {lr0.shape}, {lr1.shape}, {offset.shape}"
        )
    assert chunk >= 1, chunk
    base = {k: v.to(device) for k, v in init_params(cfg).items()}
    x, y = (t.to(device) for t in make_data(cfg))

    def run_chunk(i: int) -> torch.Tensor:
        part = [t[i : i + chunk].to(device) for t in (lr0, lr1, offset)]
        return train_chunk(cfg, base, x, y, *part, loss_and_grads)

    starts = range(0, lr0.shape[0], chunk)
    on_chunk = on_chunk or (lambda start, lanes: None)

    def in_order(logs) -> torch.Tensor:
        parts = []
        for start, log in zip(starts, logs):
            parts.append(log)
            on_chunk(start, log.shape[1])
        return torch.cat(parts, dim=1)

    if torch.device(device).type != "cpu":
        return in_order(run_chunk(i) for i in starts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers or threads) as pool:
            return in_order(pool.map(run_chunk, starts))
    finally:
        torch.set_num_threads(threads)


def phase_lanes(phase_space: str, row_values, col_values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lanes of a rows x cols grid, row-major: (lr0, lr1, offset), each [rows * cols].
    lr_vs_lr: rows = lr1 (output layer), cols = lr0 (input layer). offset_vs_lr: rows = lr (both layers),
    cols = W0 offset."""
    rows = torch.as_tensor(np.asarray(row_values, dtype=np.float64))
    cols = torch.as_tensor(np.asarray(col_values, dtype=np.float64))
    R, C = torch.meshgrid(rows, cols, indexing="ij")
    R, C = R.reshape(-1), C.reshape(-1)
    if phase_space == "lr_vs_lr":
        return C, R, torch.zeros_like(R)
    if phase_space == "offset_vs_lr":
        return R, R, C
    raise UserError(f"unknown phase space {phase_space!r}: use one of {', '.join(PHASE_SPACES)}")


def paper_grid(cfg: PaperConfig, row_values, col_values, phase_space: str = "lr_vs_lr", **train_kwargs) -> torch.Tensor:
    """Losses [steps, rows, cols] of a whole grid (see phase_lanes for what the axes are)."""
    lr0, lr1, offset = phase_lanes(phase_space, row_values, col_values)
    losses = train_paper_lanes(cfg, lr0, lr1, offset, **train_kwargs)
    return losses.view(cfg.steps, len(row_values), len(col_values))
