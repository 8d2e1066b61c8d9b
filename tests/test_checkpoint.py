"""Checkpoint dirs and model sources: round trips, nanochat quirks, clear errors, hf: and wandb: sources."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE

from fractal_vmap.checkpoint import last_step, load_checkpoint, save_checkpoint
from fractal_vmap.errors import UserError
from fractal_vmap.model import GPTConfig, param_shapes
from fractal_vmap.sources import load_model
from fractal_vmap.tokenizer import byte_tokenizer, save_tokenizer

SMALL = GPTConfig(sequence_len=16, vocab_size=100, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_params(config: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in param_shapes(config).items()}


def assert_params_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == torch.float32, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def fixture_params():
    return load_checkpoint(FIXTURE)


def copy_fixture(dest: Path, tokenizer: bool = True) -> Path:
    """The fixture's checkpoint files (and tokenizer files) flat in dest, as nanochat's HF repos hold them."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in (FIXTURE / "checkpoints").iterdir():
        shutil.copy(f, dest / f.name)
    if tokenizer:
        for f in (FIXTURE / "tokenizer").iterdir():
            shutil.copy(f, dest / f.name)
    return dest


# ---------------------------------------------------------------- round trips and nanochat quirks


def test_save_load_round_trip(tmp_path):
    params = random_params(SMALL, seed=0)
    save_checkpoint(tmp_path, 7, SMALL, params, meta={"note": "hi"})
    meta = json.loads((tmp_path / "meta_000007.json").read_text())
    assert meta["model_config"] == SMALL.to_dict() and meta["step"] == 7 and meta["note"] == "hi"
    config, loaded = load_checkpoint(tmp_path)
    assert config == SMALL
    assert_params_equal(loaded, params)


def test_latest_step_by_default_and_explicit_step(tmp_path):
    by_step = {step: random_params(SMALL, seed=step) for step in (5, 120, 30)}
    for step, params in by_step.items():
        save_checkpoint(tmp_path, step, SMALL, params)
    assert last_step(tmp_path) == 120
    assert_params_equal(load_checkpoint(tmp_path)[1], by_step[120])
    assert_params_equal(load_checkpoint(tmp_path, step=5)[1], by_step[5])
    assert_params_equal(load_checkpoint(tmp_path, step=30)[1], by_step[30])
    with pytest.raises(UserError, match="meta_000006.json is missing"):
        load_checkpoint(tmp_path, step=6)


def test_compiled_prefix_and_bf16_load_as_float32(tmp_path):
    """torch.compile's `_orig_mod.` key prefix is stripped; bf16 tensors (GPU runs) come back as float32."""
    params = random_params(SMALL, seed=1)
    bf16 = {name: p.bfloat16() for name, p in params.items()}
    torch.save({"_orig_mod." + name: p for name, p in bf16.items()}, tmp_path / "model_000000.pt")
    (tmp_path / "meta_000000.json").write_text(json.dumps({"model_config": SMALL.to_dict(), "step": 0}))
    _, loaded = load_checkpoint(tmp_path)
    assert_params_equal(loaded, {name: p.float() for name, p in bf16.items()})
    assert not torch.equal(loaded["lm_head.weight"], params["lm_head.weight"])  # bf16 did round


def test_fixture_loads_from_checkpoints_subdir(fixture_params):
    config, params = fixture_params
    assert config == GPTConfig(sequence_len=128, vocab_size=289, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    state = torch.load(FIXTURE / "checkpoints" / "model_000000.pt", weights_only=True)
    assert_params_equal(params, state)


# ---------------------------------------------------------------- clear errors


def saved_small(directory: Path) -> Path:
    save_checkpoint(directory, 0, SMALL, random_params(SMALL, seed=2))
    return directory


def test_missing_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_dir_without_model_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"no model_XXXXXX\.pt"):
        load_checkpoint(tmp_path)


def test_missing_meta(tmp_path):
    (saved_small(tmp_path) / "meta_000000.json").unlink()
    with pytest.raises(UserError, match="meta_000000.json is missing"):
        load_checkpoint(tmp_path)


def test_corrupt_model_file(tmp_path):
    saved_small(tmp_path)
    (tmp_path / "model_000000.pt").write_bytes(b"\x00garbage\xff" * 100)
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)


def test_truncated_model_file(tmp_path):
    path = saved_small(tmp_path) / "model_000000.pt"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)


def test_running_out_of_memory_while_loading_is_not_called_a_corrupt_checkpoint(tmp_path, monkeypatch):
    """The CPU allocator's RuntimeError from torch.load is a machine's limit, not a bad file: it goes on as itself."""
    saved_small(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 42 "
            "bytes"
        )

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator") as raised:
        load_checkpoint(tmp_path)
    assert not isinstance(raised.value, UserError)


def test_corrupt_meta(tmp_path):
    (saved_small(tmp_path) / "meta_000000.json").write_text('{"model_config": {')
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)


def test_meta_without_model_config(tmp_path):
    (saved_small(tmp_path) / "meta_000000.json").write_text('{"step": 0}')
    with pytest.raises(UserError, match="not a JSON object with a model_config object"):
        load_checkpoint(tmp_path)


def test_model_config_missing_a_field(tmp_path):
    config = SMALL.to_dict()
    del config["n_kv_head"]
    (saved_small(tmp_path) / "meta_000000.json").write_text(json.dumps({"model_config": config}))
    with pytest.raises(UserError, match="lacks.*n_kv_head"):
        load_checkpoint(tmp_path)


def test_state_dict_missing_a_key(tmp_path):
    params = random_params(SMALL, seed=3)
    del params["transformer.h.0.mlp.c_fc.weight"]
    save_checkpoint(tmp_path, 0, SMALL, params)
    with pytest.raises(UserError, match=r"differing keys.*transformer\.h\.0\.mlp\.c_fc\.weight"):
        load_checkpoint(tmp_path)


def test_state_dict_wrong_shape(tmp_path):
    params = random_params(SMALL, seed=4)
    params["transformer.h.0.attn.c_k.weight"] = torch.randn(16, 16)  # n_kv_head=1 says (8, 16)
    save_checkpoint(tmp_path, 0, SMALL, params)
    with pytest.raises(UserError, match=r"c_k\.weight has shape \(16, 16\), model_config says \(8, 16\)"):
        load_checkpoint(tmp_path)


def test_tokenizer_vocab_mismatch(tmp_path):
    copy_fixture(tmp_path / "model", tokenizer=False)
    save_tokenizer(byte_tokenizer(), tmp_path / "model" / "tokenizer")
    with pytest.raises(UserError, match="tokenizer has 265 tokens but the model's vocab_size is 289"):
        load_model(str(tmp_path / "model"))


def test_missing_tokenizer(tmp_path):
    # nested, so that no dir above the checkpoint (searched for a sibling tokenizer/) is outside tmp_path
    directory = copy_fixture(tmp_path / "a" / "b" / "model", tokenizer=False)
    with pytest.raises(UserError, match="no tokenizer.pkl"):
        load_model(str(directory))


def test_load_model_with_tokenizer_dir(tmp_path, fixture_params):
    directory = copy_fixture(tmp_path / "a" / "b" / "model", tokenizer=False)
    config, params, tokenizer = load_model(str(directory), tokenizer_dir=str(FIXTURE / "tokenizer"))
    assert config == fixture_params[0] and tokenizer.vocab_size == 289
    assert_params_equal(params, fixture_params[1])


# ---------------------------------------------------------------- hf: from a real offline HF cache


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline HF hub cache holding `owner/name` at COMMIT (refs/main -> COMMIT), laid out like huggingface_hub's."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both env vars once, at import: patch the module constants it consults at call time
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    repo = cache / "models--owner--name"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in [*(FIXTURE / "checkpoints").iterdir(), *(FIXTURE / "tokenizer").iterdir()]:
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.mark.parametrize("source", ["hf:owner/name", f"hf:owner/name@{COMMIT}"])
def test_hf_source_from_offline_cache(hf_cache, fixture_params, source):
    config, params, tokenizer = load_model(source)
    assert config == fixture_params[0]
    assert_params_equal(params, fixture_params[1])
    assert tokenizer.vocab_size == 289


def test_hf_repo_not_in_cache(hf_cache):
    with pytest.raises(UserError, match="hf:owner/absent is neither reachable nor in the local HF cache"):
        load_model("hf:owner/absent")


# ---------------------------------------------------------------- wandb: an already-downloaded artifact


def test_wandb_source_uses_downloaded_artifact(tmp_path, monkeypatch, fixture_params):
    monkeypatch.setenv("WANDB_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    copy_fixture(tmp_path / "artifacts" / "name:v3")
    config, params, tokenizer = load_model("wandb:entity/project/name:v3")
    assert config == fixture_params[0]
    assert_params_equal(params, fixture_params[1])
    assert tokenizer.vocab_size == 289


@pytest.mark.parametrize("spec", ["wandb:foo", "wandb:entity/project/name", "wandb:a/b/c/d:v1"])
def test_malformed_wandb_spec(spec):
    with pytest.raises(UserError, match="is not of the form wandb:<entity>/<project>/<name>:<version>"):
        load_model(spec)
