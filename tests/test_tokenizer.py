"""The tokenizer against nanochat's own outputs in the nanochat-d2 fixture."""

import json
import pickle
from pathlib import Path

import pytest
import tiktoken
import torch

from fractal_vmap.errors import UserError
from fractal_vmap.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    byte_tokenizer,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
REF = json.loads((FIXTURE / "reference.json").read_text())["tokenizer"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(FIXTURE / "tokenizer")


def test_fixture_tokenizer_basics(tok):
    assert tok.vocab_size == REF["vocab_size"] == 289
    assert tok.bos_id == REF["bos_token_id"] == 280
    assert {name: tok.special_id(name) for name in SPECIAL_TOKENS} == REF["special_token_ids"]
    assert list(REF["special_token_ids"]) == SPECIAL_TOKENS  # same names, same order
    assert tok.enc._pat_str == SPLIT_PATTERN


@pytest.mark.parametrize("sample", REF["encode_samples"], ids=lambda s: s["text"][:20])
def test_encode_matches_nanochat(tok, sample):
    assert tok.encode(sample["text"]) == sample["ids"]
    assert tok.decode(sample["ids"]) == sample["text"]


def test_encode_prepend_append(tok):
    text = REF["encode_samples"][0]["text"]
    ids = tok.encode(text, prepend=tok.bos_id, append=tok.special_id("<|assistant_end|>"))
    assert ids == REF["encode_with_prepend_bos_append_assistant_end"]


def test_encode_does_not_parse_special_strings(tok):
    ids = tok.encode("<|bos|>")
    assert tok.bos_id not in ids
    assert tok.decode(ids) == "<|bos|>"


@pytest.mark.parametrize("i", range(len(REF["render_conversation_samples"])))
def test_render_conversation_matches_nanochat(tok, i):
    sample = REF["render_conversation_samples"][i]
    ids, mask = tok.render_conversation(sample["conversation"])
    assert ids == sample["ids"]
    assert mask == sample["mask"]


def test_render_does_not_modify_the_conversation(tok):
    conversation = REF["render_conversation_samples"][0]["conversation"]
    before = json.dumps(conversation)
    tok.render_conversation(conversation)
    assert json.dumps(conversation) == before  # the system merge works on a copy


def test_render_truncates_to_max_tokens(tok):
    sample = REF["render_conversation_samples"][1]
    ids, mask = tok.render_conversation(sample["conversation"], max_tokens=30)
    assert ids == sample["ids"][:30]
    assert mask == sample["mask"][:30]


def test_render_for_completion_matches_nanochat(tok):
    conversation = REF["render_conversation_samples"][0]["conversation"]
    assert tok.render_for_completion(conversation) == REF["render_for_completion_of_first_sample"]


def test_render_for_completion_multi_turn(tok):
    # the prompt is the full render up to the last <|assistant_start|>
    sample = REF["render_conversation_samples"][2]
    prompt = tok.render_for_completion(sample["conversation"])
    last_start = len(sample["ids"]) - 1 - sample["ids"][::-1].index(tok.special_id("<|assistant_start|>"))
    assert prompt == sample["ids"][: last_start + 1]


@pytest.mark.parametrize(
    "conversation, words",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "role 'assistant' but 'user'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "message 1 has role 'user'",
        ),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}, "system message"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, "user message content must be a plain string, not list"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}, "string or a list"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": [{"type": "img", "text": "x"}]},
                ]
            },
            "unknown content part type 'img'",
        ),
    ],
)
def test_malformed_conversations_raise_user_error(tok, conversation, words):
    with pytest.raises(UserError, match=words):
        tok.render_conversation(conversation)


def test_render_for_completion_needs_final_assistant(tok):
    with pytest.raises(UserError, match="ends with an assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


def test_token_bytes_matches_fixture(tok):
    expected = torch.load(FIXTURE / "tokenizer" / "token_bytes.pt")
    got = token_bytes(tok)
    assert got.dtype == torch.int32 and got.shape == (289,)
    assert torch.equal(got, expected)
    assert got.sum().item() == REF["token_bytes_sum"] == 565
    assert (got != 0).sum().item() == REF["token_bytes_nonzero_count"] == 280
    assert got[ord("a")] == 1 and got[0x80] == 3  # a lone high byte decodes to U+FFFD: 3 bytes
    assert got[tok.bos_id :].eq(0).all()


def test_save_load_round_trip(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.enc.name == "nanochat-tiny"
    assert loaded.special_ids == tok.special_ids
    for sample in REF["render_conversation_samples"]:
        assert loaded.render_conversation(sample["conversation"]) == (sample["ids"], sample["mask"])
    saved_bytes = torch.load(tmp_path / "tok" / "token_bytes.pt")
    assert torch.equal(saved_bytes, torch.load(FIXTURE / "tokenizer" / "token_bytes.pt"))


def test_byte_tokenizer():
    tok = byte_tokenizer()
    assert tok.enc.name == "fractal-vmap-bytes"
    assert tok.vocab_size == 265  # 256 bytes + 9 specials
    assert [tok.special_id(name) for name in SPECIAL_TOKENS] == list(range(256, 265))
    text = "Héllo, wörld! 你好 🌍 123456\r\n\tend <|bos|>"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one id per byte, id == byte value
    assert tok.decode(ids) == text
    lengths = token_bytes(tok)
    assert lengths[:128].eq(1).all() and lengths[128:256].eq(3).all() and lengths[256:].eq(0).all()


def test_byte_tokenizer_renders_and_round_trips_through_disk(tmp_path):
    tok = byte_tokenizer()
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = tok.render_conversation(conversation)
    assert ids == [256, 257, ord("h"), ord("i"), 258, 259, ord("y"), ord("o"), 260]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    save_tokenizer(tok, tmp_path)
    assert load_tokenizer(tmp_path).render_conversation(conversation) == (ids, mask)


def test_load_missing_dir_or_file(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.pkl in .*nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="no tokenizer.pkl"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("payload", [b"this is not a pickle", pickle.dumps({"a": 1})[:-3]])
def test_load_corrupt_pickle(tmp_path, payload):
    (tmp_path / "tokenizer.pkl").write_bytes(payload)
    with pytest.raises(UserError, match="not a readable pickle"):
        load_tokenizer(tmp_path)


def test_load_pickle_of_wrong_type(tmp_path):
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(UserError, match="holds a dict, not a tiktoken.Encoding"):
        load_tokenizer(tmp_path)


def test_load_encoding_without_special_tokens(tmp_path):
    enc = tiktoken.Encoding(
        "plain", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
    )
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    with pytest.raises(UserError, match="lacks nanochat's special tokens"):
        load_tokenizer(tmp_path)
