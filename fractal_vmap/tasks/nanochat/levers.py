"""How a nanochat row trades time for memory (the memory model, memory.py, picks them under a budget)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Levers:
    """How a row trades time for memory. The first two change no number (bit for bit: tests/test_memory.py); the
    last two do, and are used only when asked for (their drift: benchmarks/README.md)."""

    # each layer's optimizer step as soon as its gradients are in: full gradients never all alive
    step_in_backward: bool = False
    remat: bool = False  # recompute each block's activations in the backward, keeping only its input (model.py)
    # each step's batch in this many parts, gradients accumulated (the sums run in another order)
    micro_batches: int = 1
    momentum_dtype: str = "float32"  # "bfloat16": Muon's momentum buffers in half the memory, rounded every step
    # "bfloat16": the trained weights (so their gradients, AdamW moments) in half; needs bf16 autocast
    master_dtype: str = "float32"

    def __post_init__(self):
        if self.micro_batches > 1 and self.step_in_backward:
            raise ValueError(
                "micro-batches keep the gradients between parts: they do not combine with stepping in the backward"
            )
