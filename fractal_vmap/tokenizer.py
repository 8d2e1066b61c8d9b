"""nanochat's tokenizer: a tiktoken BPE plus nine special tokens, and the chat rendering rules.

The format is nanochat's (commit 8f979a8): a tokenizer dir holds `tokenizer.pkl` (a pickled
`tiktoken.Encoding`) and `token_bytes.pt` (int32 byte length of every token id, 0 for specials).
"""

import copy
import pickle
from pathlib import Path

import tiktoken
import torch

from fractal_vmap.errors import UserError

# nanochat's special tokens, in id order (they sit right after the BPE ranks)
SPECIAL_TOKENS: list[str] = [
    "<|bos|>",  # every document / conversation starts with this
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",  # also the SFT padding token
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant (not trained on)
    "<|output_end|>",
]

# GPT-4 style pre-tokenization split, except numbers are split into groups of 1-2 digits (GPT-4 uses 1-3)
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """A tiktoken Encoding with nanochat's special tokens and conversation rendering."""

    def __init__(self, enc: tiktoken.Encoding):
        missing = [name for name in SPECIAL_TOKENS if name not in enc.special_tokens_set]
        if missing:
            raise UserError(
                f"tokenizer {enc.name!r} lacks nanochat's special tokens {missing}: use a tokenizer made by nanochat"
            )
        self.enc = enc
        self.vocab_size = enc.n_vocab
        self.special_ids = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self.bos_id = self.special_ids["<|bos|>"]

    def special_id(self, name: str) -> int:
        return self.special_ids[name]

    def encode(self, text: str, prepend: int | None = None, append: int | None = None) -> list[int]:
        """Encode text as ordinary text (special token strings in it are not parsed)."""
        ids = self.enc.encode_ordinary(text)
        if prepend is not None:
            ids.insert(0, prepend)
        if append is not None:
            ids.append(append)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Render a chat into token ids and a mask (1 = the assistant's tokens that are trained on)."""
        messages = _messages(conversation)
        first = 0  # index of messages[0] in the original list, so errors name the right message
        # a leading system message is folded into the first user message
        if messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise UserError("a system message must be followed by a user message: fix the conversation")
            merged = dict(messages[1], content=_text(messages[0]) + "\n\n" + _text(messages[1]))
            messages = [merged] + messages[2:]
            first = 1

        ids, mask = [], []

        def add(token_ids: list[int], mask_value: int):
            ids.extend(token_ids)
            mask.extend([mask_value] * len(token_ids))

        sid = self.special_ids
        add([self.bos_id], 0)
        for i, message in enumerate(messages, start=first):
            role = message.get("role")
            expected = "user" if (i - first) % 2 == 0 else "assistant"  # user first, then strictly alternating
            if role != expected:
                raise UserError(
                    f"message {i} has role {role!r} but {expected!r} was expected: "
                    "messages must alternate user/assistant starting with user (an optional system message first)"
                )
            content = message.get("content")
            if role == "user":
                add([sid["<|user_start|>"]] + self.encode(_text(message)) + [sid["<|user_end|>"]], 0)
                continue
            add([sid["<|assistant_start|>"]], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    text = part.get("text") if isinstance(part, dict) else None
                    if not isinstance(text, str):
                        raise UserError(
                            f"message {i}: every content part needs a string 'text': fix part {str(part)[:80]}"
                        )
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add([sid["<|python_start|>"]] + self.encode(text) + [sid["<|python_end|>"]], 1)
                    elif kind == "python_output":
                        add([sid["<|output_start|>"]] + self.encode(text) + [sid["<|output_end|>"]], 0)
                    else:
                        raise UserError(
                            f"message {i}: unknown content part type {kind!r}: use 'text', 'python' or 'python_output'"
                        )
            else:
                raise UserError(
                    f"message {i}: assistant content must be a string or a list of parts, not {type(content).__name__}"
                )
            add([sid["<|assistant_end|>"]], 1)

        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Render everything but the last (assistant) message, then <|assistant_start|>: a prompt to sample from."""
        messages = _messages(conversation)
        if messages[-1].get("role") != "assistant":
            raise UserError("render_for_completion needs a conversation that ends with an assistant message")
        prompt = copy.deepcopy(conversation)
        prompt["messages"] = messages[:-1]
        ids, _ = self.render_conversation(prompt)
        return ids + [self.special_ids["<|assistant_start|>"]]


def _messages(conversation: dict) -> list[dict]:
    """The conversation's message list, checked to be a non-empty list of dicts."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UserError('a conversation must be a dict with a non-empty "messages" list: fix the data')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f'message {i} is not an object: write messages as {{"role": ..., "content": ...}}')
    return messages


def _text(message: dict) -> str:
    """The content of a user or system message, which must be a plain string."""
    content = message.get("content")
    if not isinstance(content, str):
        raise UserError(
            f"{message.get('role')} message content must be a plain string, not {type(content).__name__}: fix the data"
        )
    return content


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load `tokenizer.pkl` from a nanochat tokenizer dir. (Unpickling runs code: load only dirs you trust.)"""
    path = Path(directory) / "tokenizer.pkl"
    if not path.is_file():
        raise UserError(f"no tokenizer.pkl in {directory}: pass a nanochat tokenizer dir")
    with open(path, "rb") as f:
        try:
            enc = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, ValueError, ImportError, AttributeError) as e:
            raise UserError(f"{path} is not a readable pickle ({e}): re-save the tokenizer dir with nanochat") from None
    if not isinstance(enc, tiktoken.Encoding):
        raise UserError(f"{path} holds a {type(enc).__name__}, not a tiktoken.Encoding: pass a nanochat tokenizer dir")
    return Tokenizer(enc)


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Write a nanochat tokenizer dir: tokenizer.pkl and token_bytes.pt."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "tokenizer.pkl", "wb") as f:
        pickle.dump(tokenizer.enc, f)
    torch.save(token_bytes(tokenizer), directory / "token_bytes.pt")


def token_bytes(tokenizer: Tokenizer) -> torch.Tensor:
    """int32 [vocab]: UTF-8 length of each token decoded alone, 0 for specials (for bits-per-byte)."""
    specials = set(tokenizer.special_ids.values())
    lengths = []
    for token_id in range(tokenizer.vocab_size):
        if token_id in specials:
            lengths.append(0)
        else:
            # a lone byte 0x80..0xFF decodes to U+FFFD, so it counts 3 bytes, as in nanochat
            lengths.append(len(tokenizer.decode([token_id]).encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.int32)


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer built offline: ids 0..255 are the bytes, no merges, specials at 256..264."""
    ranks = {bytes([b]): b for b in range(256)}  # rank == byte value
    specials = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("fractal-vmap-bytes", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc)
