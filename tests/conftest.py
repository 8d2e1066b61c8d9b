"""Shared test setup: the nanochat fixture path, and a per-session storage dir so the default model builds once."""

import os
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"

# Triton kernels run in Triton's CPU interpreter in tests. triton.jit reads TRITON_INTERPRET when a kernel is defined,
# triton's own library included, and collecting the tests imports triton (torch._dynamo does): so set it first, here.
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Keep the default-model cache, W&B files and HF caches out of the user's home during tests."""
    root = tmp_path_factory.mktemp("env")
    os.environ["FRACTAL_STORAGE_DIR"] = str(root / "storage")
    os.environ["WANDB_DIR"] = str(root / "wandb")
    os.environ.pop("WANDB_API_KEY", None)
    yield root


@pytest.fixture(scope="session")
def default_model(isolated_env):
    """The embedded default model dir, built once per test session (~25 s on 2 cores)."""
    from fractal_vmap.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if finetune's trainer is ever reached (a refusal must come before any training)."""
    import fractal_vmap.finetune as finetune_module

    def trainer(*args, **kwargs):
        raise AssertionError("a training step ran before the bad input was refused")

    monkeypatch.setattr(finetune_module, "train_single", trainer)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a nanochat grid looks its model up (a refusal must come first)."""
    import fractal_vmap.tasks.nanochat.task as nanochat_task

    def looked_up(source):
        raise AssertionError(f"the model {source!r} was looked up before the bad input was refused")

    monkeypatch.setattr(nanochat_task, "resolve_source", looked_up)
