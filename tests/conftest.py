"""Test setup: 8 virtual CPU devices for the multi-device tests (must happen before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def blockwise_only(monkeypatch):
    """Every softmax layer on the blockwise path (layers/blockwise_attention.py), in blocks of 8 queries and 8 key
    slots; fresh traces before and after, so that no other test reuses one."""
    import jax
    from m1jax.layers import attention

    jax.clear_caches()
    monkeypatch.setattr(attention, "MAX_SCORE_BYTES", 0)
    monkeypatch.setattr(attention, "BLOCK", 8)
    yield
    jax.clear_caches()
