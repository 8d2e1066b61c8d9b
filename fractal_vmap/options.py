"""Every command's options as plain dataclasses (simple_parsing turns each field into a flag, its comment into the
flag's help). This module imports nothing heavy, so `fractal-vmap --help` answers without loading torch.

TrainConfig holds the knobs of one fine-tuning run that `finetune` and `grid` share; FinetuneConfig (a whole cell's
settings: what the trainers read) adds the `finetune`-only ones, GridConfig adds the axes.
"""

from dataclasses import dataclass, fields

from simple_parsing import field


@dataclass
class TrainConfig:
    """The knobs of one fine-tuning run (one grid cell)."""

    # base model: a nanochat checkpoint dir, hf:<owner>/<repo>[@rev], wandb:<entity>/<project>/<name>:<version>, or
    # "default" (a tiny model built on first use)
    model: str = "default"
    tokenizer: str | None = None  # tokenizer dir, if it is neither in the model dir nor beside it
    # training conversations: a JSONL file of {"messages": [...]}, a Hugging Face dataset id, or "default" (synthetic
    # document Q&A)
    dataset: str = "default"
    # base learning rate: the matrices get it, the embedding 10x, the lm_head 0.2x (unless set below)
    learning_rate: float = 0.02
    matrix_lr: float | None = None  # learning rate of the transformer's matrices (Muon); unset: --learning_rate
    # learning rate of the token embedding (AdamW, scaled by (n_embd/768)^-0.5 as nanochat does); unset: --learning_rate
    # x --embedding_lr_mult
    embedding_lr: float | None = None
    # learning rate of the lm_head (AdamW, scaled by (n_embd/768)^-0.5); unset: --learning_rate x --unembedding_lr_mult
    unembedding_lr: float | None = None
    embedding_lr_mult: float = 10.0  # embedding lr = learning_rate x this, when --embedding_lr is unset
    unembedding_lr_mult: float = 0.2  # lm_head lr = learning_rate x this, when --unembedding_lr is unset
    # which weights train: a comma list of matrix, embedding, unembedding, or "all"; the others stay frozen
    trainable_param_groups: str = "matrix,unembedding"
    weight_decay: float = 0.1  # decoupled weight decay of the AdamW groups (embedding, lm_head); Muon has none
    init_lr_frac: float = 1.0  # every learning rate is multiplied by this
    warmup_frac: float = 0.06  # fraction of the steps spent warming the learning rate up linearly
    final_lr_frac: float = 0.0  # the cosine schedule ends at this fraction of the learning rate
    # supervised tokens to train on: steps = ceil(num_tokens / supervised tokens in the first batch)
    num_tokens: int = 20_000
    num_iterations: int | None = None  # a fixed number of steps instead of --num_tokens
    device_batch_size: int = 8  # conversations per step
    max_seq_len: int = 1024  # longest conversation in tokens; longer ones are cut
    dtype: str = "auto"  # float32, bfloat16 (autocast), or auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # cpu, cuda, cuda:N, or auto: CUDA if available
    seed: int = 999  # seed of the data order
    # a run is trainable when the mean of its last this-many losses is below the threshold times its first loss
    trainable_window_steps: int = 20
    trainable_loss_ratio_threshold: float = 1.0  # that threshold (mean of the last losses / first loss)
    # LoRA: train a rank-R adapter W + (alpha / R) B A on each adapted matrix (AdamW, lr = the matrix lr), every base
    # weight frozen, the lm_head and embedding too; 0: off (full fine-tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0  # LoRA's alpha: the adapters' update is scaled by alpha / lora_rank
    # the block matrices that get adapters: all, or a comma list of c_q, c_k, c_v, attn.c_proj, c_fc, mlp.c_proj
    lora_targets: str = "all"
    run_name: str | None = None  # a name for the run (W&B, result file); unset: one made from the settings
    # Weights & Biases logging: online, offline (files to sync later), disabled, or auto: online with credentials, else
    # offline
    wandb: str = "auto"
    wandb_project: str = "fractal-vmap"  # W&B project
    wandb_entity: str | None = None  # W&B entity (user or team); unset: your default entity


@dataclass
class FinetuneConfig(TrainConfig):
    """One fine-tuning run (one grid cell) with torch.optim AdamW + Muon: every setting a cell trains with."""

    # validation conversations (JSONL file or dataset id); the default dataset brings its own
    val_dataset: str | None = None
    eval_every: int = 0  # evaluate on the validation set every this-many steps; 0: only at the end
    eval_batches: int = 4  # validation batches per evaluation
    out: str | None = None  # where to write the result JSON; unset: runs/finetune/<run_name>.json


@dataclass
class GridConfig(TrainConfig):
    """A 2-D grid of fine-tuning runs: every run setting, plus the two axes swept and their ranges."""

    # what each cell trains: nanochat-sft (fine-tuning a nanochat model), or paper-mlp (the MLP of Sohl-Dickstein 2024,
    # one lane a pixel; its axes follow --phase_space)
    task: str = "nanochat-sft"
    # the rows axis and the cols axis, comma-separated, from: num_tokens, lr, matrix_lr, unembedding_lr, embedding_lr,
    # weight_decay, warmup_frac, final_lr_frac, seed, lora_rank, lora_alpha; unset: num_tokens,lr (a paper-mlp grid's
    # follow --phase_space)
    axes: str | None = None
    rows: int = 6  # number of values on the rows axis
    cols: int = 16  # number of values on the cols axis (the lanes of a row)
    row_min: float | None = None  # smallest rows-axis value; unset: the axis' own range
    row_max: float | None = None  # largest rows-axis value; unset: the axis' own range
    col_min: float | None = None  # smallest cols-axis value; unset: the axis' own range
    col_max: float | None = None  # largest cols-axis value; unset: the axis' own range
    row_scale: str = "auto"  # spacing of the rows-axis values: log, linear, or auto (the axis' usual one)
    col_scale: str = "auto"  # spacing of the cols-axis values: log, linear, or auto
    # where the grid's files go; rerunning with the same dir resumes it; unset: runs/grid-<axes>-<hash of the settings>
    run_dir: str | None = None
    lane_chunk: int = 0  # most lanes trained at once; 0: a whole row on CUDA, 8 on CPU; halves itself on out-of-memory
    # nudge every base weight up by this many float32 ulps: the twin of a grid, to `compare` against (the map's noise
    # floor)
    perturb_ulp: int = 0
    # a finished grid over the same axes to be the twin of: train only its boundary cells and their neighbours (where a
    # label can change), the other cells taking its results (grid/twin.py); with --perturb_ulp or another --seed
    twin_of: str | None = None
    # optimizer steps and the lanes' head: auto (Triton on CUDA, torch elsewhere), torch, or triton (on CPU only under
    # TRITON_INTERPRET=1: slow, for debugging)
    kernels: str = "auto"
    # the row's forward and backward under torch.compile: on, off, or auto (on for CUDA, off for CPU, where it measured
    # no faster: benchmarks/README.md); on moves the numbers within the noise floor, so it is part of the grid's
    # settings
    compile: str = "auto"
    width: int = 8  # paper-mlp: input dim and hidden width of the MLP (the paper used 16)
    activation: str = "tanh"  # paper-mlp: tanh, relu or identity
    # paper-mlp: lr_vs_lr (rows lr1 of the output layer, cols lr0 of the input layer; log10 lr in [-3, 6]) or
    # offset_vs_lr (rows one lr, cols an offset added to every initial input-layer weight)
    phase_space: str = "lr_vs_lr"
    data_multiple: float = 1.0  # paper-mlp: training points = parameters x this (the identity network: width x this)
    # refine K levels near the boundary: the --rows x --cols grid, then K times half the spacing where neighbours
    # disagree in phase (a (rows-1) x 2^K + 1 map at a fraction of its cells); 0: off
    refine: int = 0
    # processes sharing the rows on this node (one per GPU; on CPU each gets cores / N threads), started by torch's
    # elastic launcher; under torchrun leave it out
    workers: int = 1
    # most memory a lane chunk may use, e.g. 2GB; unset: the GPU's on CUDA, no limit on CPU
    memory_budget: str | None = None
    # memory levers that change no number: auto (what the memory budget needs), none, or a comma list of
    # step_in_backward, remat
    levers: str = "auto"
    # split each step's batch in this many parts, gradients accumulated: less memory, numbers drift (another sum order)
    micro_batches: int = 1
    # bfloat16: Muon's momentum in half the memory, rounded each step (changes the numbers)
    momentum_dtype: str = "float32"
    # bfloat16: the trained weights in half the memory, updates rounded (changes the numbers; needs --dtype bfloat16)
    master_dtype: str = "float32"


@dataclass
class PlotConfig:
    """Redraw a finished grid's pictures from its files, optionally re-thresholded or restyled, without training."""

    run: str = field(positional=True, metavar="RUN", help="a grid's run dir")
    out: str | None = None  # where to write the pictures (and, when re-thresholded, fractal.json); unset: the run dir
    # relabel the cells with this threshold (from the loss curves in the row files); unset: the grid's
    trainable_loss_ratio_threshold: float | None = None
    trainable_window_steps: int | None = None  # relabel the cells with this window; unset: the grid's
    dpi: int = 150  # resolution of the PNGs
    style: str | None = None  # a matplotlib style sheet (name or file) to draw with, e.g. ggplot


@dataclass
class PlanConfig:
    """Options of `fractal-vmap plan`: how many lanes of a model fit on a GPU, and (--project) how fast they would
    run."""

    # dN (nanochat's depth-N shapes, e.g. d20: 20 layers, width 1280, vocab 65536), default, or a checkpoint dir
    model: str = "d20"
    lanes: int = 16  # the lanes wanted in one chunk
    gpu_mem: str = "80GB"  # the memory of one GPU (e.g. 80GB for an H100, 141GB for an H200)
    batch: int = 8  # device_batch_size
    seq: int = 1024  # max_seq_len
    dtype: str = "bfloat16"  # the forward's autocast: bfloat16 (as on CUDA) or float32 (as on CPU)
    trainable_param_groups: str = "matrix,unembedding"
    lora_rank: int = 0  # LoRA lanes of this rank (only the adapters train, the base shared by every lane); 0: off
    lora_targets: str = "all"  # the block matrices that get adapters (see `grid --help`)
    # auto (the first of: none, step_in_backward, remat, both, that fits --lanes), none, or a comma list
    levers: str = "auto"
    micro_batches: int = 1  # changes the numbers (see tasks/nanochat/levers.py)
    momentum_dtype: str = "float32"  # bfloat16 changes the numbers (see tasks/nanochat/levers.py)
    master_dtype: str = "float32"  # bfloat16 changes the numbers (see tasks/nanochat/levers.py)
    # h100 or h200: project each configuration that fits (levers auto) and choose the fastest; the step time,
    # speed-up, MFU and a 64x64 grid's time (a projection); none: memory only, the most lanes
    project: str = "h100"
    launch_us: float = 10.0  # host time per kernel launch in the projection (projection.LAUNCH_US)
    supervised_frac: float = 0.7  # supervised share of a batch's tokens, for the grid's step count in the projection
    json: str | None = None  # also write the plan as JSON to this path


@dataclass
class BenchConfig:
    """Options of `fractal-vmap bench`: the training throughput of a row, sequential models vs the eager row vs the
    compiled row."""

    device: str = "auto"  # auto = cuda if available, else cpu
    # default (the embedded model on its data) or depth (random-init nanochat by --depths); auto: default on CPU, depth
    # on CUDA
    model: str = "auto"
    depths: list[int] = field(default_factory=lambda: [4, 8, 12, 20])  # nanochat depths, with --model depth
    lanes: list[int] = field(default_factory=list)  # L values; empty = 1 2 4 8 16 on CPU, 1 4 16 64 on CUDA
    modes: list[str] = field(default_factory=lambda: ["sequential", "row", "fast"])  # from sequential, row, fast
    batch_size: int = 8  # rows of a random batch (nanochat's device_batch_size), with --model depth
    seq_len: int = 1024  # tokens per row of a random batch, with --model depth
    vocab_size: int = 65536  # nanochat's tokenizer, with --model depth
    context: int = 2048  # the model's sequence_len (rotary table), with --model depth
    warmup: int = 0  # untimed steps after the primers (0 = 2 on CPU, 3 on CUDA)
    steps: int = 0  # steps per timed window (0 = 8 on CPU, 4 on CUDA)
    repeats: int = 3  # timed windows per mode: the best on CPU, the median on CUDA
    # the default model, L = 1 and 8, one window of 3 steps, batches padded to one length: < 2 min on 2 CPU cores
    quick: bool = False
    # CPU: wait for a 1-minute load average below this first, and redo a measurement others disturbed (0: neither)
    max_load: float = 1.2
    # h100 or h200: instead of measuring, PROJECT one step of the --depths rows and the sequential loop on that
    # datasheet GPU (no GPU needed: traced under FakeTensorMode, torch's roofline estimator + a launch cost)
    project: str = "none"
    out: str = ""  # result JSON (default runs/bench/bench-<device>.json); the markdown table goes beside it (.md)


@dataclass
class ZoomConfig:
    """A new grid inside a box of a finished grid, with the same settings; its grid.json records the parent and the
    box."""

    run: str = field(positional=True, metavar="RUN", help="a finished grid's run dir")
    # the box in the parent's cells, half-open: r0:r1,c0:c1 (rows r0..r1-1, cols c0..c1-1), e.g. from `fractal-vmap
    # boxes RUN`
    box: str | None = None
    range: str | None = None  # the box in axis values instead: rows=LO:HI,cols=LO:HI (e.g. rows=1e-2:1e1,cols=1e3:1e4)
    # rows of the new grid; 0: the box's rows at the parent's spacing (the parent's exact values, so its cells are
    # reproduced)
    rows: int = 0
    cols: int = 0  # cols of the new grid; 0: the box's cols at the parent's spacing
    square: bool = False  # widen the shorter side of the box (in log10 on a log axis) so the new grid covers a square
    # refine the new grid K levels near its boundary (grid --refine): --rows x --cols is then its coarse grid, and the
    # map (rows - 1) x 2^K + 1 by (cols - 1) x 2^K + 1; 0: a plain grid
    refine: int = 0
    run_dir: str | None = None  # where the new grid goes; unset: runs/grid-<axes>-<hash of the settings>


@dataclass
class BoxesConfig:
    """Suggest where to zoom: the boxes of a finished grid with the most boundary (edge pixels), best first."""

    run: str = field(positional=True, metavar="RUN", help="a finished grid's run dir")
    size: int = 0  # box side in cells; 0: a sixteenth of the grid's shorter side (at least 2)
    count: int = 4  # boxes to suggest (non-overlapping)


@dataclass
class AnimateConfig:
    """A zoom animation through a chain of runs, each a `zoom` of the one before: the parent with the child's box drawn,
    then the child. A GIF always, an MP4 beside it when ffmpeg is installed."""

    runs: list[str] = field(positional=True, nargs="+", metavar="RUN", help="the runs, outermost first")
    out: str = "zoom.gif"  # the GIF's path (the MP4 goes beside it)
    size: int = 512  # frame side in pixels (even)
    frame_ms: int = 1000  # how long each frame shows


def is_given(cfg, name: str) -> bool:
    """Whether a setting differs from its default: given on the command line or in a config file. (A flag given at its
    default value cannot be told apart, and changes nothing.)"""
    default = next(f.default for f in fields(cfg) if f.name == name)
    return getattr(cfg, name) != default


@dataclass
class StudyConfig:
    """One command from a model to an answer: a refined map, zooms into its boundary, twins for the noise floor, the
    calibrated dimension of every level and rules of thumb for a safe learning rate (study/)."""

    # where the study's grids (one run dir each), study.json and REPORT.md go; rerunning with the same dir resumes
    study_dir: str = "runs/study"
    task: str = "nanochat-sft"  # nanochat-sft, or paper-mlp (the MLP of Sohl-Dickstein 2024: its lr1 x lr0 map)
    model: str = "default"  # nanochat-sft: the base model (as grid --model)
    dataset: str = "default"  # nanochat-sft: the training conversations (as grid --dataset)
    quick: bool = False  # a first look: a coarser map, one zoom, small token budgets (minutes on a laptop CPU)
    coarse: int = 0  # side of every level's coarse grid; 0: 9 (quick: 5), paper-mlp 33 (quick: 17)
    refine: int = 0  # refinement levels of every map (its side is (coarse - 1) x 2^refine + 1); 0: 3 (quick: 2)
    zooms: int = -1  # zoom levels below the map, each into its parent's box with the most boundary; -1: 3 (quick: 1)
    zoom_box: float = 0.25  # side of a zoom's box as a fraction of its parent's side
    # nanochat-sft: the map's two axes (rows,cols), any two of the task's continuous axes; empty: matrix_lr,
    # unembedding_lr (with --lora_rank: matrix_lr,lora_alpha, since under LoRA the lm_head is frozen)
    plane: str = ""
    # nanochat-sft: the token budget of the map; 0: 500 (8 steps of the default model's batches)
    num_tokens: int = 0
    # nanochat-sft: the smallest of the num_tokens x lr plane's token budgets (log-spaced); 0: 250
    token_min: int = 0
    token_max: int = 0  # the largest of those budgets; 0: 4000 (quick: 1000)
    token_rows: int = 0  # coarse rows (token budgets) of the num_tokens x lr plane; 0: 5 (quick: 3)
    token_refine: int = 0  # refinement levels of the num_tokens x lr plane; 0: 2
    # nanochat-sft: LoRA lanes of this rank in every grid of the study (as grid --lora_rank); 0: full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 16.0  # LoRA's alpha (as grid --lora_alpha)
    lora_targets: str = "all"  # the block matrices that get adapters (as grid --lora_targets)
    # the twins of every map, trained on its boundary only: ulp (base weights nudged 1 ulp), seed (another data order;
    # nanochat only), a comma list, or none
    twins: str = "ulp,seed"
    device: str = "auto"  # cpu, cuda, cuda:N, or auto
    seed: int = 999  # nanochat-sft: the data order of the maps (their seed twin takes seed + 1); paper-mlp: its network
    wandb: str = "auto"  # every grid's W&B logging: online, offline, disabled, or auto
    wandb_project: str = "fractal-vmap"  # W&B project of the study's run and its grids' runs
    wandb_entity: str | None = None  # W&B entity (user or team); unset: your default entity
