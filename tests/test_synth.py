"""Tests for the synthetic document question answering set."""

import json

import pytest

from fractal_vmap.synth import FAMILIES, _is_validation, doc_qa_conversations, documents, write_jsonl

TITLES = {
    "INVOICE",
    "RECEIPT",
    "SHIPPING FORM",
    "EMPLOYEE RECORD",
    "BANK STATEMENT",
    "PRODUCT TABLE",
    "EVENT TICKET",
    "LAB RESULT",
}


def _key(conversation: dict) -> str:
    return json.dumps(conversation, sort_keys=True)


def _split_user(conversation: dict) -> tuple[str, str]:
    document, question = conversation["messages"][0]["content"].split("\n\nQuestion: ")
    return document, question


def test_deterministic():
    assert doc_qa_conversations(200, seed=3) == doc_qa_conversations(200, seed=3)
    assert doc_qa_conversations(200, seed=3, split="validation") == doc_qa_conversations(
        200, seed=3, split="validation"
    )
    assert documents(200, seed=3) == documents(200, seed=3)


def test_prefix_stable():
    # a smaller n gives the first items of a larger n: n only decides where to stop
    assert doc_qa_conversations(50, seed=1) == doc_qa_conversations(100, seed=1)[:50]


def test_seed_sensitive():
    a, b = doc_qa_conversations(100, seed=0), doc_qa_conversations(100, seed=1)
    assert len({_key(c) for c in a} & {_key(c) for c in b}) < 5  # essentially no overlap
    assert documents(100, seed=0) != documents(100, seed=1)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        doc_qa_conversations(10, seed=0, split="test")


def test_train_validation_disjoint():
    train = doc_qa_conversations(5000, seed=0)
    validation = doc_qa_conversations(1000, seed=0, split="validation")
    assert not {_key(c) for c in train} & {_key(c) for c in validation}
    # stronger: no validation document is ever seen in train or in pretraining documents
    train_docs = {_split_user(c)[0] for c in train} | set(documents(5000, seed=0))
    assert not {_split_user(c)[0] for c in validation} & train_docs


def test_split_buckets():
    # the guarantee behind disjointness: each document hashes into exactly one split, whatever the seed
    for seed in (0, 1):
        assert not any(_is_validation(_split_user(c)[0]) for c in doc_qa_conversations(300, seed=seed))
        assert all(_is_validation(_split_user(c)[0]) for c in doc_qa_conversations(300, seed=seed, split="validation"))
        assert not any(_is_validation(d) for d in documents(300, seed=seed))


def test_distinct():
    train = doc_qa_conversations(5000, seed=0)
    assert len({_key(c) for c in train}) >= 4900
    assert len(set(documents(5000, seed=0))) >= 4900


def test_well_formed():
    for split in ("train", "validation"):
        conversations = doc_qa_conversations(500, seed=7, split=split)
        assert len(conversations) == 500
        for c in conversations:
            assert list(c) == ["messages"]
            user, assistant = c["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            document, question = _split_user(c)
            answer = assistant["content"]
            assert answer and answer == answer.strip() and len(answer) <= 25
            assert answer in document  # the exact value is in the document, never in the question alone
            assert question.endswith("?")


def test_ascii_and_length():
    texts = documents(2000, seed=5)
    texts += [c["messages"][0]["content"] + c["messages"][1]["content"] for c in doc_qa_conversations(2000, seed=5)]
    for text in texts:
        assert text.isascii()
    for document in documents(2000, seed=5):
        assert 100 <= len(document) <= 400
        assert 5 <= len(document.splitlines()) <= 10


def test_every_family_appears():
    assert len(FAMILIES) == len(TITLES)
    conversations = doc_qa_conversations(500, seed=11)
    assert {_split_user(c)[0].splitlines()[0] for c in conversations} == TITLES
    assert {d.splitlines()[0] for d in documents(500, seed=11)} == TITLES


def test_answers_match_fields():
    # spot checks that answers come from the right line, not just anywhere in the document
    for c in doc_qa_conversations(2000, seed=2):
        document, question = _split_user(c)
        answer = c["messages"][1]["content"]
        lines = document.splitlines()
        if question == "What is the total?":
            assert f"Total: {answer}" in lines
        if question == "Who is the recipient?":
            assert f"Recipient: {answer}" in lines
        if question == "Is the result normal, high or low?":
            assert f"Flag: {answer}" in lines and answer in ("Low", "Normal", "High")


def test_invoice_arithmetic():
    # total = subtotal + tax on every invoice
    def money(line):
        return round(float(line.split(": ")[1].replace(",", "")) * 100)

    invoices = [d for d in documents(500, seed=4) if d.startswith("INVOICE")]
    assert invoices
    for doc in invoices:
        fields = {line.split(": ")[0]: line for line in doc.splitlines()[1:]}
        assert money(fields["Subtotal"]) + money(fields["Tax"]) == money(fields["Total"])
        assert money(fields["Tax"]) > 0


def test_write_jsonl_round_trip(tmp_path):
    conversations = doc_qa_conversations(50, seed=9)
    path = tmp_path / "train.jsonl"
    write_jsonl(conversations, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 50
    assert [json.loads(line) for line in lines] == conversations
