"""Shared test fixtures.

Converted packaged models and materialised random models go to one cache under the repo
(`.cache/test-models`, gitignored), so the GGUF conversions happen once and are reused by later
sessions. Set before any test module imports nla_universal: some config defaults read it at import.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("NLA_UNIVERSAL_CACHE", str(REPO / ".cache" / "test-models"))

from nla_universal.config import ModelSpec, PoolConfig, load_pool  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pool() -> PoolConfig:
    """configs/pools/tiny-all.yaml: one tiny random model per supported architecture family."""
    return load_pool("tiny-all")


@pytest.fixture(scope="session")
def demo_pool() -> PoolConfig:
    return load_pool("demo")


@pytest.fixture(scope="session")
def smollm2_spec(demo_pool) -> ModelSpec:
    """The real SmolLM2-135M-Instruct (packaged GGUF), as the demo pool lists it."""
    return demo_pool.spec("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_spec(demo_pool) -> ModelSpec:
    """The real Gemma 3 270M (packaged GGUF), as the demo pool lists it."""
    return demo_pool.spec("gemma3-270m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (and much faster on a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A tiny run folder (tests/tiny_run.py): passages with z, activations, fitted adapters. Copy before changing it."""
    from tiny_run import make_prepared

    return make_prepared(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="session")
def refitted(prepared, tmp_path_factory):
    """The tiny run after sft-ar, sft-av and refit-dec: a bundle ready for RL. Copy before changing it."""
    from tiny_run import make_refitted

    return make_refitted(prepared, tmp_path_factory.mktemp("rl") / "run")
