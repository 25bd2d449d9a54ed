"""Test set-up: 8 virtual CPU devices for mesh tests, fp32 matmuls, shared tiny fixtures."""

import os

# Must happen before JAX initialises its backends anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def wildjailbreak_dir():
    """The 512 real seed prompts in ../shared/data (read in place, never copied)."""
    path = SHARED_DATA / "wildjailbreak_vanilla"
    if not path.is_dir():
        pytest.fail(f"shared seed data not found at {path}")
    return path
