"""A grid's rows over many workers: `torchrun --nproc_per_node=N -m fractal_vmap grid ...` (one node, or many through
Slurm: scripts/slurm_grid.sh), or `grid --workers N` (torch's own elastic launcher, in this process, one node).

One worker a GPU (LOCAL_RANK picks it); on CPU, N processes. Every worker plans the grid, so all hold the same spec.
Rank 0 alone takes the run dir's lock, writes grid.json and starts the W&B run, then tells the others to go (or that
it was refused). Workers claim rows one at a time from a counter in the torch.distributed store, so a fast worker
takes more rows, and skip a claimed row that has a finished file of this spec. Rank 0 gathers every worker's lanes,
then writes the tables and pictures and logs the one W&B run.

Why the merged grid equals a one-process grid bit for bit at equal threads: rows are independent, and a lane's numbers
do not depend on its chunk or neighbours (lanes.py), so it does not matter which worker trains a row. But each of N
CPU workers gets cores / N threads where one process has all of them, and on some CPUs (Intel with MKL) a matmul's
rounding depends on the thread count: so each row file records its threads and device (rundir.py), and rank 0, which
hears every worker's, warns once before any row is trained when the rows left would differ from the finished ones.

Faults: a row file is written atomically when its row is done, so a worker killed mid-row loses only that row. The
elastic agent then stops the other workers (their unfinished rows go too) and starts them all again, or a plain rerun
does the same: rows with a file are skipped, the rest trained. A restart needs a fresh store: torch's agent otherwise
keeps one store across restarts, and gloo's group cannot form again over the last start's keys (it waits forever), so
`--workers` and scripts/slurm_grid.sh set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (rank 0 then serves a new store each
start) and a torchrun that would restart over a kept store is refused. gloo carries the little the workers say to
each other, on GPUs too: no tensors travel between them.
"""

import json
import os
import signal
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import torch

from fractal_vmap.analysis.runs import read_row, row_path
from fractal_vmap.console import console
from fractal_vmap.errors import UserError
from fractal_vmap.grid.lock import run_dir_lock
from fractal_vmap.grid.pipeline import finish_grid, open_grid, plan_grid, run_rows
from fractal_vmap.grid.rundir import spec_digest, this_machine
from fractal_vmap.options import GridConfig
from fractal_vmap.recipe import resolve_device
from fractal_vmap.tasks import get_task
from fractal_vmap.tracking import closing_run

# how long a worker waits for the others (rank 0's start, the slowest worker's last row): longer than any grid. A dead
# worker is noticed by the elastic agent within a second, not by this timeout, which only ends a hang.
WAIT = timedelta(days=7)
MAX_RESTARTS = 1  # `--workers`: after a worker dies, the agent starts the workers once more (finished rows are kept)
COUNTER = "fractal_vmap/next_row"  # the store's row counter (a fresh store each start, see the module docstring)
FRESH_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"  # torch's switch: "1" = not the agent's kept store


def world_size() -> int:
    """Workers in this grid: torchrun (or --workers) sets WORLD_SIZE; a plain process is a world of one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_workers(cfg: GridConfig) -> None:
    """--workers and torchrun against the grid's task and mode, one clear line each."""
    task = get_task(cfg.task)
    many = cfg.workers > 1 or world_size() > 1
    if many and cfg.refine:
        raise UserError("--refine runs in one process: leave out --workers and torchrun")
    if many and not task.WORKERS:
        raise UserError(
            f"--workers is for nanochat grids: a {cfg.task} grid runs in one process (its chunks use every core)"
        )
    if cfg.workers < 1:
        raise UserError(f"--workers is {cfg.workers}: use 1 (this process) or more (one per GPU, or CPU processes)")
    if cfg.workers > 1 and world_size() > 1:
        raise UserError(
            "--workers starts its own workers: under torchrun leave it out (torchrun's --nproc_per_node says how many)"
        )


def claims(store, rows: int):
    """Row indices this worker claims, one at a time, until every row is claimed."""
    while (i := store.add(COUNTER, 1) - 1) < rows:
        yield i


class RankLines:
    """What a worker other than rank 0 shows: a plain line a row (rank 0 draws the live view)."""

    def __init__(self, rank: int):
        self.rank, self.t0 = rank, time.perf_counter()

    def __enter__(self) -> "RankLines":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def row_started(self, i: int, description: str, lanes: int) -> None:
        self.t0 = time.perf_counter()
        console.print(f"rank {self.rank}: row {i} ({description}), {lanes} lanes", highlight=False)

    def chunk(self, lanes: list[int], steps: list[int]) -> None:
        return None  # no per-step view: the engine gets no callback

    def row_finished(self, i: int) -> None:
        console.print(f"rank {self.rank}: row {i} done in {time.perf_counter() - self.t0:.1f} s", highlight=False)

    def row_skipped(self, i: int) -> None:
        pass


class RowLog:
    """Stands in for the W&B run on a worker other than rank 0: keeps the per-row metrics for rank 0 to log."""

    def __init__(self):
        self.logged: list[dict] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


def join(cfg: GridConfig):
    """This worker's place in the group torchrun (or --workers) started: its GPU (by LOCAL_RANK) and the gloo group.
    Returns (rank, size, store)."""
    import torch.distributed as dist

    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    ):
        raise UserError(
            "torchrun would restart these workers over the store it keeps, where they cannot meet again: export "
            f"{FRESH_STORE}=1 "
            "and use a c10d rendezvous (--rdzv-backend c10d, or --standalone), as scripts/slurm_grid.sh does, or pass "
            "--max-restarts 0"
        )
    if cfg.device.startswith("cuda:"):
        raise UserError(
            f"--device {cfg.device} names one GPU, but each worker takes the GPU of its LOCAL_RANK: pass --device cuda "
            "(or auto)"
        )
    if resolve_device(cfg.device).type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this worker's GPU
    store, rank, size = next(dist.rendezvous("env://", timeout=WAIT))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=WAIT)
    return rank, size, store


def run_worker(cfg: GridConfig) -> None:
    """One worker of a grid over WORLD_SIZE > 1 workers (see the module docstring)."""
    import torch.distributed as dist

    rank, size, store = join(cfg)
    plan = plan_grid(cfg)
    cfg.run_dir = str(plan.run_dir)  # what an interrupted run's resume command names (cli.py)
    rows = len(plan.row.values)
    digest, wandb_run, refusal = spec_digest(plan.spec), None, None
    machines = [None] * size if rank == 0 else None  # every worker's (device, threads), for rank 0's resume warning
    dist.gather_object(this_machine(plan.device), machines, dst=0)
    with ExitStack() as held:
        if rank == 0:
            try:
                held.enter_context(run_dir_lock(plan.run_dir))
                digest, wandb_run = open_grid(plan, set(machines))
            except UserError as e:
                refusal = str(e)
        word = [refusal]  # rank 0's word: go (None), or why not
        dist.broadcast_object_list(word, src=0)
        if word[0] is not None:
            raise UserError(word[0])
        # every worker keeps its rows' metrics; rank 0 logs them all in row order (W&B steps only increase)
        log = RowLog()
        progress = None if rank == 0 else RankLines(rank)
        with closing_run(wandb_run, plan.run_dir / "wandb"):
            lanes = run_rows(plan, digest, log, claims(store, rows), progress, rank)
            gathered = [None] * size if rank == 0 else None
            dist.gather_object((rank, lanes, log.logged), gathered, dst=0)
            if rank == 0:
                merge(plan, gathered, wandb_run)
    dist.destroy_process_group()


def merge(plan, gathered: list[tuple], wandb_run) -> None:
    """Rank 0: every worker's lanes in grid order, the per-row metrics they kept, then the tables and pictures."""
    lanes = sorted(
        (lane for _, worker_lanes, _ in gathered for lane in worker_lanes), key=lambda r: (r["grid_i"], r["grid_j"])
    )
    expected = [(i, j) for i in range(len(plan.row.values)) for j in range(len(plan.col.values))]
    if [(r["grid_i"], r["grid_j"]) for r in lanes] != expected:  # every row claimed exactly once: a bug otherwise
        raise RuntimeError(f"the workers returned {len(lanes)} lanes, not each of the {len(expected)} cells once")
    if wandb_run is not None:
        for _, _, logged in gathered:
            for metrics, step in sorted(logged, key=lambda m: m[1]):
                wandb_run.log(metrics, step=step)
    claimed = {rank: len({r["grid_i"] for r in worker_lanes}) for rank, worker_lanes, _ in gathered}
    console.print(
        "rows claimed by worker: " + "; ".join(f"rank {r}: {n}" for r, n in sorted(claimed.items())), highlight=False
    )
    finish_grid(plan, lanes, wandb_run)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rows_to_train(cfg: GridConfig) -> int:
    """The rows without a finished file, where --run_dir names a grid already begun (its grid.json's digest); else all
    of them. Cheap (no model is loaded): it only sizes the launch, the workers check everything again."""
    grid_json = Path(cfg.run_dir or "") / "grid.json"
    if cfg.run_dir is None or not grid_json.is_file():
        return cfg.rows
    try:
        digest = json.loads(grid_json.read_text()).get("digest")
    except (ValueError, AttributeError):  # unreadable: the workers refuse it in one line
        return cfg.rows
    return sum(read_row(row_path(Path(cfg.run_dir), i), cfg.cols, digest) is None for i in range(cfg.rows))


def workers_to_start(cfg: GridConfig, rows: int, capacity: int, unit: str) -> int:
    """--workers, capped at the rows to train and at the GPUs or cores (`capacity` of `unit`), with one line when
    capped: a worker beyond them only waits or shares a core (64 workers on 2 cores for 2 rows took 164 s, not 10 s).
    Capping changes no number: each worker keeps the threads --workers gives it (launch)."""
    workers = max(1, min(cfg.workers, rows, capacity))
    if workers < cfg.workers:
        console.print(
            f"--workers {cfg.workers}: starting {workers} ({rows} row{'s' if rows != 1 else ''} to train, "
            f"{capacity} {unit}); more would only wait or share a core",
            highlight=False,
            soft_wrap=True,
        )
    return workers


def launch(cfg: GridConfig, entrypoint) -> None:
    """`grid --workers N`: torch's elastic agent, in this process, starts N workers on this node, each running
    `entrypoint(cfg)` (a function that returns None, or a user error, or its line, for us to raise once). A worker
    that dies makes the agent stop the others and start them all once more; a second death fails the grid."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.workers > torch.cuda.device_count():
        raise UserError(
            f"--workers {cfg.workers} but this node has {torch.cuda.device_count()} GPUs: one worker a GPU, pass at "
            "most that many"
        )
    cuda = device.type == "cuda"
    capacity, unit = (torch.cuda.device_count(), "GPUs") if cuda else (cpu_cores(), "CPU cores")
    workers = workers_to_start(cfg, rows_to_train(cfg), capacity, unit)
    # on CPU the workers share the cores (an OMP_NUM_THREADS already set wins) as --workers asked, capped or not;
    # each row file records the threads its row ran with (rundir.py)
    if not cuda:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // cfg.workers)))
    os.environ[FRESH_STORE] = "1"  # a fresh store for each start, so a restart can form its group (module docstring)
    # as `torchrun --standalone`: a c10d rendezvous on a free local port, a fresh run id
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=workers,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=uuid.uuid4().hex,
        max_restarts=MAX_RESTARTS,
        start_method="spawn",
    )
    try:
        said = elastic_launch(config, entrypoint)(cfg)
    except SignalException as e:
        if e.sigval == signal.SIGINT:  # the agent has stopped the workers: report it as the one-process grid does
            raise KeyboardInterrupt from None
        raise
    errors = [said[r] for r in sorted(said) if said[r] is not None]
    if errors:
        raise errors[0] if isinstance(errors[0], UserError) else UserError(errors[0])
