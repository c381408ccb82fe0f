"""Logits parity with transformers' MiniMaxForCausalLM (random weights, fp32), loaded through from_pretrained.

Sequence lengths below, at and well above several lightning blocks (small block sizes and the real 256),
batch > 1, a left-padded batch, both tensor-name layouts, and softmax layers that are not only last.
"""

import json

import numpy as np
import pytest

import m1jax
from hf_oracle import hf_config, hf_logits, random_hf_model, save_hf_model, save_layout

M1_PATTERN = ("lightning", "lightning", "lightning", "softmax")
EARLY_SOFTMAX = ("softmax", "lightning", "lightning", "softmax", "lightning", "lightning")


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved model per (pattern, block size), in the original layout; loaded lazily by the tests."""
    cache = {}

    def get(pattern=M1_PATTERN, block_size=4, layout="original"):
        key = (pattern, block_size, layout)
        if key not in cache:
            hf = random_hf_model(hf_config(pattern, block_size=block_size), seed=len(cache))
            d = tmp_path_factory.mktemp("hf")
            path = save_hf_model(hf, d / "m") if layout == "original" else save_layout(hf, d / "m", layout)
            cache[key] = hf, m1jax.from_pretrained(path)
        return cache[key]

    return get


@pytest.mark.parametrize("block_size,seq_len", [(4, 3), (4, 4), (4, 19), (256, 300), (256, 256), (8, 70)])
def test_logits_match_transformers(saved, block_size, seq_len):
    hf, model = saved(block_size=block_size)
    ids = np.random.default_rng(seq_len).integers(0, hf.config.vocab_size, (2, seq_len))
    assert rel_err(model(ids), hf_logits(hf, ids)) <= 1e-5


def test_softmax_layers_not_only_last(saved):
    hf, model = saved(EARLY_SOFTMAX, block_size=4)
    assert model.config.cycle == EARLY_SOFTMAX[:3] and model.config.num_cycles == 2
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 23))
    assert rel_err(model(ids), hf_logits(hf, ids)) <= 1e-5


def test_fused_transformers_layout(saved):
    hf, model = saved(layout="transformers")
    names = json.dumps(list(hf.state_dict()))
    assert "gate_up_proj" in names
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, (2, 17))
    assert rel_err(model(ids), hf_logits(hf, ids)) <= 1e-5


def test_left_padded_batch(saved):
    hf, model = saved()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, hf.config.vocab_size, (3, 15))
    mask = np.ones((3, 15), np.int64)
    mask[1, :6] = 0
    mask[2, :11] = 0
    positions = np.maximum(mask.cumsum(1) - 1, 0)  # transformers needs them explicitly under left padding
    want = hf_logits(hf, ids, attention_mask=mask, position_ids=positions)
    got = np.asarray(model(ids, attention_mask=mask))
    real = mask.astype(bool)
    assert rel_err(got[real], want[real]) <= 1e-5
