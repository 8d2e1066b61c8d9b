"""SFT data: load chat conversations (JSONL, a Hugging Face dataset, or the synthetic default), render them, stream
batches, and count a run's steps. Shared by `finetune` (one run) and the grid's nanochat task (rows of lanes).

Batches follow nanochat's chat_sft collation: one conversation per row, inputs = ids[:-1] padded with
<|assistant_end|>, targets = ids[1:] with -1 (ignored by the loss) where the mask is 0 and on padding.
"""

import json
from pathlib import Path

import torch

from fractal_vmap.errors import UserError
from fractal_vmap.model import GPTConfig
from fractal_vmap.options import FinetuneConfig, TrainConfig
from fractal_vmap.tokenizer import Tokenizer

DEFAULT_TRAIN_EXAMPLES, DEFAULT_VAL_EXAMPLES = 4000, 400  # the synthetic doc-QA set's split sizes
Example = tuple[list[int], list[int]]  # (token ids, mask) of one rendered conversation


def load_conversations(source: str, split: str = "train") -> list[dict]:
    """Conversations from a JSONL file (one {"messages": [...]} per line) or a Hugging Face dataset id.

    `split` picks the split of a hub dataset (or local dataset dir); a JSONL file is one split and ignores it.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return _load_jsonl(path)
    looks_like_path = source.startswith(("/", "./", "../", "~")) or path.suffix in (".jsonl", ".json")
    if looks_like_path and not path.exists():
        raise UserError(f"dataset path {source} does not exist: pass a JSONL file or a Hugging Face dataset id")

    import datasets  # only needed for hub datasets, so imported here

    try:
        rows = datasets.load_dataset(source, split=split)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError, ValueError) as e:
        # ValueError: datasets' "Unknown split" and similar; the message says which
        reason = str(e).replace("\n", " ")
        raise UserError(
            f"cannot load split {split!r} of dataset {source!r} ({reason}): pass a JSONL file or a reachable hub id "
            "and split"
        ) from None
    if "messages" not in rows.column_names:
        raise UserError(
            f"dataset {source!r} has columns {rows.column_names} but no 'messages': use a chat dataset with a messages "
            "list"
        )
    conversations = []
    for i, row in enumerate(rows):
        if not isinstance(row["messages"], list):
            raise UserError(f"dataset {source!r} row {i}: 'messages' is not a list: fix that row")
        conversations.append({"messages": row["messages"]})
    if not conversations:
        raise UserError(f"dataset {source!r} split {split!r} is empty: pass a dataset with conversations")
    return conversations


def _load_jsonl(path: Path) -> list[dict]:
    """Read one conversation per non-blank line, naming the line of anything malformed (and the byte, of text that is
    not UTF-8)."""
    conversations = []
    offset = 0  # of the line's first byte in the file
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} line {lineno} (byte {offset + e.start}): not UTF-8 ({e.reason}, "
                    f"byte 0x{raw[e.start]:02x}): save the file as UTF-8"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path} line {lineno}: not valid JSON ({e.msg}): "
                    'make each line one JSON object like {"messages": [...]}'
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise UserError(
                    f'{path} line {lineno}: no "messages" list: make each line one JSON object like '
                    f'{{"messages": [...]}}'
                )
            conversations.append(row)
    if not conversations:
        raise UserError(f"{path} has no conversations: write one JSON object per line")
    return conversations


def render_examples(conversations: list[dict], tokenizer: Tokenizer, max_seq_len: int) -> tuple[list[Example], int]:
    """Render every conversation to at most max_seq_len + 1 tokens; drop those with nothing to train on.

    Returns (examples, number dropped).
    """
    if max_seq_len < 2:
        raise UserError(f"max_seq_len is {max_seq_len}: it must be at least 2")
    examples, dropped = [], 0
    for i, conversation in enumerate(conversations):
        try:
            ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_seq_len + 1)  # +1: the shift
        except UserError as e:
            raise UserError(f"conversation {i}: {e}") from None
        if any(mask[1:]):  # mask[1:] lines up with the targets
            examples.append((ids, mask))
        else:
            dropped += 1
    if not examples:
        raise UserError(
            f"dataset has no supervised tokens: all {dropped} conversations have no assistant tokens within "
            f"max_seq_len={max_seq_len}; add assistant replies or raise max_seq_len"
        )
    return examples, dropped


def collate(examples: list[Example], pad_id: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples into int64 (inputs, targets) [B, T].

    T is the longest example minus one, or seq_len when given (fixed-shape batches).
    Inputs are padded with pad_id; targets are -1 where the mask is 0 and on padding.
    """
    T = max(len(ids) for ids, _ in examples) - 1 if seq_len is None else seq_len
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -1, dtype=torch.long)  # -1 is the loss's ignore_index
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        if n > T:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len={T}")
        ids_t = torch.tensor(ids, dtype=torch.long)
        inputs[row, :n] = ids_t[:-1]
        targets[row, :n] = torch.where(torch.tensor(mask[1:]) == 1, ids_t[1:], -1)
    return inputs, targets


class SFTStream:
    """Deterministic batches: step s is a slice of an endless stream of shuffled epochs.

    Epoch e visits the examples in the order torch.randperm(N, generator seeded with seed + e);
    batch s takes stream positions s*batch_size .. (s+1)*batch_size - 1, crossing into the next epoch as needed.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, seq_len: int | None = None):
        if batch_size < 1:
            raise UserError(f"batch_size is {batch_size}: it must be at least 1")
        if not examples:
            raise UserError("no examples to train on: pass a dataset with supervised tokens")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.seq_len = seq_len
        self.orders: dict[int, list[int]] = {}  # epoch -> example order, computed on first use

    def order(self, epoch: int) -> list[int]:
        if epoch not in self.orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self.orders[epoch] = torch.randperm(len(self.examples), generator=generator).tolist()
        return self.orders[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.examples)
        rows = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, index = divmod(position, n)
            rows.append(self.examples[self.order(epoch)[index]])
        return collate(rows, self.pad_id, self.seq_len)


def steps_for_tokens(num_tokens: int, first_targets: torch.Tensor) -> int:
    """Steps needed to train on num_tokens supervised tokens, counting them on the first batch (at least 1)."""
    if num_tokens < 0:
        raise UserError(f"num_tokens is {num_tokens}: it must not be negative")
    per_step = int((first_targets != -1).sum())
    if per_step == 0:
        raise UserError("the first batch has no supervised tokens: check the dataset's assistant messages")
    return max(1, -(-num_tokens // per_step))  # ceil division


def conversations(source: str, split: str) -> list[dict]:
    if source == "default":
        from fractal_vmap.synth import doc_qa_conversations

        return doc_qa_conversations(
            DEFAULT_TRAIN_EXAMPLES if split == "train" else DEFAULT_VAL_EXAMPLES, seed=0, split=split
        )
    return load_conversations(source, split)


def render_split(cfg: FinetuneConfig, tokenizer: Tokenizer, config: GPTConfig, split: str) -> tuple[list, int]:
    """The rendered examples of a dataset split and how many were dropped for having no supervised token."""
    if cfg.max_seq_len > config.sequence_len * 10:  # nanochat precomputes rotary for 10x its sequence_len
        raise UserError(
            f"--max_seq_len {cfg.max_seq_len} exceeds the model's rotary table ({config.sequence_len * 10}): lower it"
        )
    source = cfg.dataset if split == "train" else (cfg.val_dataset or cfg.dataset)
    return render_examples(conversations(source, split), tokenizer, cfg.max_seq_len)


def make_stream(cfg: TrainConfig, tokenizer: Tokenizer, examples: list, seed: int) -> SFTStream:
    """SFT batches padded with <|assistant_end|>, in an order drawn from the seed."""
    return SFTStream(examples, cfg.device_batch_size, seed, tokenizer.special_id("<|assistant_end|>"))


def total_steps(cfg: TrainConfig, first_targets: torch.Tensor) -> int:
    return cfg.num_iterations if cfg.num_iterations is not None else steps_for_tokens(cfg.num_tokens, first_targets)


def lane_batches(seeds: list[int], streams: dict[int, SFTStream], pad_id: int):
    """Shared batches [B, T] when every lane has the same seed, else one stream per lane stacked to [L, B, T]."""
    if len(set(seeds)) == 1:
        return streams[seeds[0]].batch

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [streams[s].batch(step) for s in seeds]
        T = max(x.shape[1] for x, _ in pairs)  # right-padding more columns changes no loss (causal, targets -1)
        inputs = torch.stack([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=pad_id) for x, _ in pairs])
        targets = torch.stack([torch.nn.functional.pad(y, (0, T - y.shape[1]), value=-1) for _, y in pairs])
        return inputs, targets

    return batches
