"""The seed's whole workload end to end, both ways, on one 8-GPU node: a PROJECTION (the GPU steps are roofline.py's),
with the host costs MEASURED on a CPU (benchmarks/seed_host.py writes host_costs.json beside this file).

(a) The seed's way: one process per grid cell, 4096 / 8 = 512 cells one after another on each GPU. Each pays the
    host costs (interpreter and `import torch`, loading the 561M-parameter d20 checkpoint from local disk, rendering
    the cell's data, building the optimizer), during which its GPU idles, then its steps, each one model's `finetune`
    step as roofline.single_step_times projects it.
(b) fractal-vmap: each GPU trains its 512 cells in chunks of the lanes the planner chose (perf/choose.py), each chunk
    a row step a step (roofline.row_step_times), the host costs paid once a worker. Lanes that diverge leave the row at
    the next host sync (dead-lane compaction, lanes.run): a measured grid's share of diverged lanes (`divergence` in
    host_costs.json) leaves after its measured share of the steps, and the chunk runs on with the rest, its step
    time taken as proportional to its lanes (a compute-bound row; an assumption, stated where it is printed).

Not counted on either side: CUDA context creation and the model's copy to the GPU (once a cell in (a), once a worker
in (b): counting them would favour (b)), and eight processes sharing the node's cores for their imports in (a).
"""

import json
import math
from pathlib import Path

HOST_COSTS = Path(__file__).with_name("host_costs.json")
HOST_KEYS = ("import_torch_s", "checkpoint_load_s", "data_render_s", "optimizer_build_s")


def host_costs() -> dict:
    """The measured host costs (and the measured grid's divergence), as benchmarks/seed_host.py wrote them."""
    return json.loads(HOST_COSTS.read_text())


def workload(
    single_s: float,
    row_s: float,
    lanes: int,
    steps: int,
    cells: int = 64 * 64,
    gpus: int = 8,
    costs: dict | None = None,
) -> dict:
    """Both ways' seconds for `cells` cells of `steps` steps on `gpus` GPUs (see the module docstring), their ratio, and
    what they rest on."""
    costs = costs or host_costs()
    host = sum(costs["measured"][k] for k in HOST_KEYS)
    per_gpu = math.ceil(cells / gpus)
    seed = per_gpu * (host + steps * single_s)
    div = costs.get("divergence", {"diverged_frac": 0.0, "steps_kept_frac": 1.0})
    # a chunk's lane-steps with the diverged share leaving after its kept share of the steps, over a full chunk's
    kept = 1 - div["diverged_frac"] * (1 - div["steps_kept_frac"])
    chunks = math.ceil(per_gpu / lanes)
    rows = host + chunks * steps * row_s * kept
    return {
        "cells": cells,
        "gpus": gpus,
        "steps_per_cell": steps,
        "host_per_cell_s": host,
        "seed_s": seed,
        "seed_gpu_idle_frac": per_gpu * host / seed,
        "lanes": lanes,
        "chunks_per_gpu": chunks,
        "compaction_kept_frac": kept,
        "divergence": div,
        "rows_s": rows,
        "ratio": seed / rows,
    }
