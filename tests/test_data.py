"""SFT data: loading, rendering, nanochat's collation (checked against the fixture's batches), the stream."""

import json
from pathlib import Path

import pytest
import torch

from fractal_vmap.data import SFTStream, collate, load_conversations, render_examples, steps_for_tokens
from fractal_vmap.errors import UserError
from fractal_vmap.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
SAMPLES = json.loads((FIXTURE / "reference.json").read_text())["tokenizer"]["render_conversation_samples"]
PAD = 284  # <|assistant_end|> in the fixture tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(FIXTURE / "tokenizer")


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- loading


def test_load_jsonl(tmp_path):
    rows = [sample["conversation"] for sample in SAMPLES]
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(rows[0]), "", "   ", *[json.dumps(r) for r in rows[1:]]])
    assert load_conversations(str(path)) == rows  # blank lines are skipped


def test_load_jsonl_bad_json_names_the_line(tmp_path):
    path = write_lines(
        tmp_path / "bad.jsonl", [json.dumps(chat("a", "b")), "", '{"messages": [', json.dumps(chat("c", "d"))]
    )
    with pytest.raises(UserError, match=r"bad\.jsonl line 3: not valid JSON") as info:
        load_conversations(str(path))
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize("bad", ['{"text": "hello"}', '{"messages": "hi"}', "[1, 2]", "42"])
def test_load_jsonl_missing_messages_names_the_line(tmp_path, bad):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(chat("a", "b")), bad])
    with pytest.raises(UserError, match=r"d\.jsonl line 2: no \"messages\" list"):
        load_conversations(str(path))


def test_load_missing_or_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_conversations("./no/such/dataset/dir")
    with pytest.raises(UserError, match="no conversations"):
        load_conversations(str(write_lines(tmp_path / "empty.jsonl", ["", ""])))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache inside the test's tmp dir."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_load_local_dataset_dir_through_datasets(tmp_path, datasets_cache):
    # a dataset directory as on the hub (data/<split>.jsonl), loaded offline by the real datasets.load_dataset
    rows = [chat(f"question {i}", f"answer {i}") for i in range(5)]
    (tmp_path / "ds" / "data").mkdir(parents=True)
    write_lines(tmp_path / "ds" / "data" / "train.jsonl", [json.dumps(r) for r in rows])
    write_lines(tmp_path / "ds" / "data" / "test.jsonl", [json.dumps(r) for r in rows[:2]])
    assert load_conversations(str(tmp_path / "ds")) == rows
    assert load_conversations(str(tmp_path / "ds"), split="test") == rows[:2]
    with pytest.raises(UserError, match="cannot load split 'validation'.*Unknown split"):
        load_conversations(str(tmp_path / "ds"), split="validation")


def test_load_dataset_without_messages_column(tmp_path, datasets_cache):
    (tmp_path / "ds" / "data").mkdir(parents=True)
    write_lines(tmp_path / "ds" / "data" / "train.jsonl", [json.dumps({"text": "a"}), json.dumps({"text": "b"})])
    with pytest.raises(UserError, match=r"has columns \['text'\] but no 'messages'"):
        load_conversations(str(tmp_path / "ds"))


# ----------------------------------------------------------------------------- rendering


def test_render_examples_matches_nanochat_renders(tok):
    conversations = [sample["conversation"] for sample in SAMPLES]
    examples, dropped = render_examples(conversations, tok, max_seq_len=1024)
    assert dropped == 0
    assert examples == [(sample["ids"], sample["mask"]) for sample in SAMPLES]


def test_render_examples_truncates_and_drops(tok):
    # samples 0 and 1 have their first supervised token at position 23
    assert SAMPLES[0]["mask"].index(1) == SAMPLES[1]["mask"].index(1) == 23
    conversations = [SAMPLES[0]["conversation"], chat("Hi", "Yo"), SAMPLES[1]["conversation"]]
    # max_seq_len 22 keeps 23 tokens: position 23 is cut, nothing left to learn in samples 0 and 1
    examples, dropped = render_examples(conversations, tok, max_seq_len=22)
    assert dropped == 2
    assert examples == [tok.render_conversation(chat("Hi", "Yo"))]
    # max_seq_len 23 keeps position 23, which is a target after the shift
    examples, dropped = render_examples(conversations, tok, max_seq_len=23)
    assert dropped == 0
    assert examples[0] == (SAMPLES[0]["ids"][:24], SAMPLES[0]["mask"][:24])
    assert all(len(ids) <= 24 for ids, _ in examples)


def test_all_unsupervised_dataset_raises(tok):
    only_users = [{"messages": [{"role": "user", "content": "hello there"}]}] * 3
    with pytest.raises(UserError, match="dataset has no supervised tokens: all 3 conversations"):
        render_examples(only_users, tok, max_seq_len=64)
    with pytest.raises(UserError, match="dataset has no supervised tokens"):
        render_examples([SAMPLES[0]["conversation"]], tok, max_seq_len=10)  # cut before the assistant


def test_render_examples_bad_inputs(tok):
    with pytest.raises(UserError, match="max_seq_len is 1"):
        render_examples([chat("a", "b")], tok, max_seq_len=1)
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(UserError, match="conversation 1: message 1 has role 'user'"):
        render_examples([chat("a", "b"), bad], tok, max_seq_len=64)


# ----------------------------------------------------------------------------- collation


def test_collate_by_hand():
    examples = [
        ([10, 11, 12, 13, 14], [0, 0, 1, 1, 1]),
        ([10, 20, 21], [0, 1, 0]),
    ]
    inputs, targets = collate(examples, pad_id=99)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [[10, 11, 12, 13], [10, 20, 99, 99]]
    assert targets.tolist() == [[-1, 12, 13, 14], [20, -1, -1, -1]]
    inputs, targets = collate(examples, pad_id=99, seq_len=6)
    assert inputs.tolist() == [[10, 11, 12, 13, 99, 99], [10, 20, 99, 99, 99, 99]]
    assert targets.tolist() == [[-1, 12, 13, 14, -1, -1], [20, -1, -1, -1, -1, -1]]
    with pytest.raises(ValueError):
        collate(examples, pad_id=99, seq_len=3)


def test_collate_reference_renders():
    # samples 2 and 3 render to 36 tokens each, sample 0 to 31: T = 35
    examples = [(SAMPLES[i]["ids"], SAMPLES[i]["mask"]) for i in (0, 2, 3)]
    inputs, targets = collate(examples, pad_id=PAD)
    assert inputs.shape == targets.shape == (3, 35)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1]
        assert inputs[row, n:].eq(PAD).all() and targets[row, n:].eq(-1).all()
        expected = [t if m == 1 else -1 for t, m in zip(ids[1:], mask[1:])]
        assert targets[row, :n].tolist() == expected
    # sample 0: "Hi Eve!" + <|assistant_end|> are the 8 targets, right after <|assistant_start|> at input 22
    assert targets[0].ne(-1).sum() == 8 and targets[0, 22].item() == 72 and targets[0, 29].item() == PAD
    # sample 2 is multi-turn: both assistant replies (6 tokens + end, 9 tokens + end) are targets
    assert targets[1].ne(-1).sum() == 17


def conversation_from_row(tok: Tokenizer, inputs: list[int]) -> dict:
    """Parse one fixture input row back into a conversation (system text is already merged into the user's)."""
    sid = tok.special_ids
    specials = set(sid.values())
    assert inputs[0] == tok.bos_id
    messages, i = [], 1
    while i < len(inputs) and inputs[i] == sid["<|user_start|>"]:
        end = inputs.index(sid["<|user_end|>"], i)
        messages.append({"role": "user", "content": tok.decode(inputs[i + 1 : end])})
        assert inputs[end + 1] == sid["<|assistant_start|>"]
        i, parts = end + 2, []
        # the last reply's <|assistant_end|> is not an input; the first padding token stands in for it
        while inputs[i] != sid["<|assistant_end|>"]:
            if inputs[i] in (sid["<|python_start|>"], sid["<|output_start|>"]):
                kind = "python" if inputs[i] == sid["<|python_start|>"] else "python_output"
                end = inputs.index(inputs[i] + 1, i)  # the matching *_end id is the next one
                parts.append({"type": kind, "text": tok.decode(inputs[i + 1 : end])})
                i = end + 1
            else:
                end = i
                while inputs[end] not in specials:
                    end += 1
                parts.append({"type": "text", "text": tok.decode(inputs[i:end])})
                i = end
        messages.append({"role": "assistant", "content": parts})
        i += 1
    return {"messages": messages}


def test_fixture_batches_rerendered_and_collated(tok):
    # nanochat made these from 120 conversations with render_conversation(max_tokens=65), padded to 64 columns
    data = torch.load(FIXTURE / "trajectories.pt")
    batch_inputs, batch_targets = data["batch_inputs"], data["batch_targets"]
    assert batch_inputs.shape == batch_targets.shape == (30, 4, 64)
    assert batch_targets.ne(-1).sum() == 2049
    for step in range(30):
        conversations = [conversation_from_row(tok, row.tolist()) for row in batch_inputs[step]]
        examples, dropped = render_examples(conversations, tok, max_seq_len=64)
        assert dropped == 0
        inputs, targets = collate(examples, pad_id=tok.special_id("<|assistant_end|>"), seq_len=64)
        assert torch.equal(inputs, batch_inputs[step]), step
        assert torch.equal(targets, batch_targets[step]), step
        # without seq_len the batch is as wide as its longest row; the fixture's extra columns are all padding
        inputs, targets = collate(examples, pad_id=PAD)
        T = max(len(ids) for ids, _ in examples) - 1
        assert inputs.shape == (4, T)
        assert torch.equal(inputs, batch_inputs[step, :, :T]) and torch.equal(targets, batch_targets[step, :, :T])
        assert batch_inputs[step, :, T:].eq(PAD).all() and batch_targets[step, :, T:].eq(-1).all()


def test_fixture_padding_structure():
    data = torch.load(FIXTURE / "trajectories.pt")
    inputs, targets = data["batch_inputs"].reshape(120, 64), data["batch_targets"].reshape(120, 64)
    for row in range(120):
        x, y = inputs[row].tolist(), targets[row].tolist()
        n = 64 - next(k for k in range(64) if x[63 - k] != PAD)  # inputs before the trailing padding
        assert y[n - 1] == PAD  # the final <|assistant_end|> is the last target...
        assert all(t == -1 for t in y[n:])  # ...and every padded position is ignored
        assert y[0] == -1  # bos -> user_start is never trained on


# ----------------------------------------------------------------------------- the stream


def toy_examples(n: int) -> list[tuple[list[int], list[int]]]:
    """n distinct examples; example k has a first target of 100 + k, so rows identify their example."""
    return [([1, 100 + k, 2 + k % 3, 7][: 3 + k % 2], [0, 1, 1, 1][: 3 + k % 2]) for k in range(n)]


def example_ids(targets: torch.Tensor) -> list[int]:
    return [int(t) - 100 for t in targets[:, 0]]


def test_stream_is_deterministic_and_seeded():
    examples = toy_examples(10)
    a, b = SFTStream(examples, 4, seed=999, pad_id=0), SFTStream(examples, 4, seed=999, pad_id=0)
    c = SFTStream(examples, 4, seed=1000, pad_id=0)
    for step in [5, 0, 3, 1000]:  # any order, any step
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [example_ids(a.batch(s)[1]) for s in range(5)] != [example_ids(c.batch(s)[1]) for s in range(5)]


def test_stream_epochs_and_wrap():
    examples = toy_examples(5)
    stream = SFTStream(examples, batch_size=2, seed=7, pad_id=0)
    stream_ids = [k for step in range(5) for k in example_ids(stream.batch(step)[1])]  # 10 positions = 2 epochs
    order0 = torch.randperm(5, generator=torch.Generator().manual_seed(7)).tolist()
    order1 = torch.randperm(5, generator=torch.Generator().manual_seed(8)).tolist()
    assert stream_ids == order0 + order1
    assert sorted(stream_ids[:5]) == sorted(stream_ids[5:]) == [0, 1, 2, 3, 4]  # each epoch sees every example once
    # batch 2 straddles the epochs: the last example of epoch 0, then the first of epoch 1
    assert example_ids(stream.batch(2)[1]) == [order0[4], order1[0]]
    # a batch larger than the dataset wraps through several epochs
    big = SFTStream(examples, batch_size=12, seed=7, pad_id=0)
    assert example_ids(big.batch(0)[1])[:10] == order0 + order1


def test_stream_batches_are_collated_and_supervised(tok):
    examples, _ = render_examples([s["conversation"] for s in SAMPLES], tok, max_seq_len=64)
    stream = SFTStream(examples, batch_size=3, seed=0, pad_id=PAD, seq_len=64)
    for step in range(4):
        inputs, targets = stream.batch(step)
        assert inputs.shape == targets.shape == (3, 64)
        assert targets.ne(-1).sum(dim=1).gt(0).all()  # every row has something to learn


def test_stream_bad_inputs():
    with pytest.raises(UserError, match="batch_size is 0"):
        SFTStream(toy_examples(3), batch_size=0, seed=0, pad_id=0)
    with pytest.raises(UserError, match="no examples"):
        SFTStream([], batch_size=2, seed=0, pad_id=0)


def test_steps_for_tokens():
    targets = torch.full((4, 64), -1)
    targets[0, :59] = 5  # 59 supervised tokens, as in the fixture's first batch
    assert steps_for_tokens(59, targets) == 1
    assert steps_for_tokens(60, targets) == 2
    assert steps_for_tokens(2049, targets) == 35  # ceil(2049 / 59)
    assert steps_for_tokens(0, targets) == 1  # at least one step
    with pytest.raises(UserError, match="num_tokens is -1"):
        steps_for_tokens(-1, targets)
    with pytest.raises(UserError, match="no supervised tokens"):
        steps_for_tokens(10, torch.full((2, 8), -1))


def test_steps_for_tokens_on_fixture_batch():
    first = torch.load(FIXTURE / "trajectories.pt")["batch_targets"][0]
    assert steps_for_tokens(1000, first) == -(-1000 // 59)


def test_byte_tokenizer_end_to_end(tmp_path):
    tok = byte_tokenizer()
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(chat("2+2?", "4")), json.dumps(chat("hi", "hello"))])
    examples, dropped = render_examples(load_conversations(str(path)), tok, max_seq_len=16)
    assert dropped == 0
    inputs, targets = SFTStream(examples, 2, seed=1, pad_id=tok.special_id("<|assistant_end|>")).batch(0)
    assert inputs.shape == (2, 11)  # longest render: bos us h i ue as h e l l o ae = 12 tokens, minus the shift
    supervised = sorted(targets.ne(-1).sum(dim=1).tolist())
    assert supervised == [2, 6]  # "4" + end, "hello" + end
