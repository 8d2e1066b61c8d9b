"""One grid row of a random nanochat d<depth> model, trained in several lane chunks by `fractal-vmap grid` (the whole
pipeline: data, chunks, host syncs, compaction, the row file), against the runtime PROJECTION of `plan` for the same
lanes and levers (perf/plan.py, roofline.py): the measured seconds a row step, the projected ones, and their ratio.

    PYTHONPATH=$PWD python3 benchmarks/grid_row.py --device cuda --depth 20 --out $OUT/grid_row.json   # on a GPU
    uv run python benchmarks/grid_row.py --device cpu --depth 1 --cols 4 --lane_chunk 2 --steps 2       # CPU analogue

The checkpoint is random (only shapes and time matter here) with a byte-level tokenizer, written to a temporary
dir; the dataset is the default synthetic doc-QA set; embeddings frozen, bf16 autocast on CUDA, --compile off (the
projection is of the eager step). The row's wall time includes its host syncs and data, so it is an upper bound for
the step alone.
"""

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_json  # noqa: E402

from fractal_vmap.checkpoint import save_checkpoint  # noqa: E402
from fractal_vmap.cli import main as cli  # noqa: E402
from fractal_vmap.model import nanochat_depth, param_shapes  # noqa: E402
from fractal_vmap.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN  # noqa: E402


@dataclass
class Options:
    device: str = "cuda"
    depth: int = 20
    cols: int = 32  # cells in the row
    lane_chunk: int = 16  # lanes a chunk (the row runs cols / lane_chunk chunks)
    levers: str = "none"  # the memory levers, as `grid --levers` and `plan --levers` take them
    steps: int = 8  # steps a cell (--num_iterations)
    vocab: int = 65536  # the model's vocab (nanochat's tokenizer); smaller only for the CPU analogue
    plan: str = ""  # a `plan --json` file with the projection to compare against; empty: run `plan` here
    out: str = ""  # result JSON (default: no file)


def random_checkpoint(directory: Path, depth: int, vocab: int) -> Path:
    config = replace(nanochat_depth(depth), vocab_size=vocab)
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen) * 0.02 for k, s in param_shapes(config).items()}
    save_checkpoint(directory, 0, config, params)
    # the byte-level tokenizer (ids 0..255) with its specials at the top of the model's vocab, so the two agree
    import pickle

    import tiktoken

    V = config.vocab_size
    specials = {name: V - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
    ranks = {bytes([b]): b for b in range(256)}
    enc = tiktoken.Encoding("bytes-wide", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    return directory


def projected(opts: Options, tmp: Path) -> dict:
    if opts.plan:
        return json.loads(Path(opts.plan).read_text())["projection"]
    path = tmp / "plan.json"
    model = f"d{opts.depth}" if opts.vocab == 65536 else str(tmp / "model")  # the checkpoint's own shapes
    args = ["plan", "--model", model, "--lanes", str(opts.lane_chunk), "--levers", opts.levers]
    cli([*args, "--project", "h100", "--json", str(path)])
    return json.loads(path.read_text())["projection"]


def main(opts: Options) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_checkpoint(tmp / "model", opts.depth, opts.vocab)
        p = projected(opts, tmp)
        run_dir = tmp / "run"
        start = time.perf_counter()
        cli(
            ["grid", "--model", str(model), "--device", opts.device, "--wandb", "disabled", "--run_dir", str(run_dir)]
            + ["--axes", "matrix_lr,unembedding_lr", "--rows", "1", "--cols", str(opts.cols), "--compile", "off"]
            + ["--num_iterations", str(opts.steps), "--lane_chunk", str(opts.lane_chunk), "--levers", opts.levers]
        )
        wall = time.perf_counter() - start
        row = json.loads(next((run_dir / "rows").glob("row_*.json")).read_text())
    chunks = -(-opts.cols // opts.lane_chunk)
    step_s = row["seconds"] / (chunks * opts.steps)
    report = {
        "options": asdict(opts),
        "environment": environment(torch.device(opts.device)),
        "row_seconds": row["seconds"],
        "wall_seconds": wall,
        "chunks": chunks,
        "measured_step_s": step_s,
        "projected_step_s": p["row_s"],
        "projected_lanes": p["lanes"],
        "measured_over_projected": step_s / p["row_s"],
    }
    print(
        f"d{opts.depth} row of {opts.cols} cells in {chunks} chunks of {opts.lane_chunk} on "
        f"{report['environment']['device']}: {step_s * 1e3:.1f} ms a row step MEASURED (row file, syncs and data "
        f"included) against {p['row_s'] * 1e3:.1f} ms PROJECTED for {p['lanes']} lanes on {p['gpu']}: "
        f"{report['measured_over_projected']:.2f}x"
    )
    if opts.out:
        write_json(report, Path(opts.out))
    return report


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_arguments(Options, dest="opts")
    main(parser.parse_args().opts)
