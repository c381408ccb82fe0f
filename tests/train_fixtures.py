"""Shared pieces of the training tests: a tiny M1 (both layer kinds, 4 experts) and a small packed corpus."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from train.config import TrainConfig
from train.data import write_token_dataset

TINY_MODEL = {"preset": "m1-tiny", "overrides": {"num_layers": 2, "layer_types": ["lightning", "softmax"],
                                                 "hidden_size": 32, "intermediate_size": 48, "vocab_size": 64}}


def corpus(path: Path, docs: int = 200, seed: int = 0) -> Path:
    """Documents of a learnable pattern (counting runs with a random start and step), random lengths 3..30."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(docs):
        start, stride, n = rng.integers(1, 60), rng.integers(1, 4), rng.integers(3, 31)
        out.append([1 + (start + stride * i) % 60 for i in range(n)] + [63])
    return write_token_dataset(path, out, 64)


def tiny_config(tmp_path: Path, corpus_path: Path | None = None, **sections) -> TrainConfig:
    base = {
        "model": TINY_MODEL,
        "data": {"path": str(corpus_path or corpus(tmp_path / "data")), "seq_len": 32, "batch_size": 8},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "loss": {"aux_coef": 0.01, "z_coef": 1e-3},
        "run": {"steps": 6, "dir": str(tmp_path / "run"), "compute_dtype": "float32", "checkpoint_every": 2,
                "log_every": 1, "progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The tests build the same tiny trainer many times (fresh runs, resumed runs, subprocesses): with a
    persistent compilation cache each distinct step compiles once. Restored after the module."""
    path = tmp_path_factory.mktemp("jax_cache")
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    cc.reset_cache()
