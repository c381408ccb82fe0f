"""checkpoints_convert: HF -> orbax -> HF, bit-exact; logits against transformers; dry run on a full-size M1 index;
destination safety and an interrupted conversion (a killed process)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import MiniMaxForCausalLM

import m1jax
from checkpoints_convert import (convert_hf_to_orbax, is_orbax_checkpoint, load_orbax_checkpoint, load_orbax_params,
                                 read_config, save_orbax_checkpoint)
from checkpoints_convert.cli import main
from checkpoints_convert.staging import staging_path
from hf_oracle import BUFFERS, hf_config, hf_logits, hf_tensors, random_hf_model, save_hf_model, save_layout
from m1jax import PRESETS
from m1jax.model import params_of
from m1jax.sharding import make_mesh, param_shardings
from m1jax.weights import CheckpointError, load_hf_checkpoint
from test_weights import PATTERN, assert_trees_equal, expected_params, read_all

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(hf_config(PATTERN, experts=4, intermediate_size=48), seed=5)


def convert(*argv) -> int:
    return main([*map(str, argv), "--no-progress"])


def assert_same_tensors(got: dict, want: dict):
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


# ---- round trips --------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(hf_model, tmp_path):
    """M1's dtypes: bf16 weights, fp32 router, scattered shards; every tensor, name, shape and dtype survives."""
    src = save_layout(hf_model, tmp_path / "hf", "original", dtype="bfloat16", router_dtype="float32", shards=4)
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt") == 0
    assert is_orbax_checkpoint(tmp_path / "ckpt") and read_config(tmp_path / "ckpt").dtype == "bfloat16"
    assert convert("orbax-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "out",
                   "--max-shard-size", "40KB") == 0
    source = {n: t for n, t in read_all(src).items() if not n.endswith(BUFFERS)}
    assert_same_tensors(read_all(tmp_path / "out"), source)
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 5
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
    for f in shards:  # at most 40 kB of tensors (+ the header), unless one tensor alone is larger
        alone = list(index["weight_map"].values()).count(f.name) == 1
        assert f.stat().st_size <= 40_000 + 2_000 or alone


def test_transformers_layout_exports_original_names(hf_model, tmp_path):
    src = save_layout(hf_model, tmp_path / "hf", "transformers")
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt") == 0
    assert convert("orbax-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "out") == 0
    original = {n: t for n, t in hf_tensors(hf_model, "original").items() if not n.endswith(BUFFERS)}
    assert_same_tensors(read_all(tmp_path / "out"), original)


def test_dtype_and_router_dtype_options(hf_model, tmp_path):
    src = save_layout(hf_model, tmp_path / "hf", "original")
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt", "--dtype", "bfloat16") == 0
    assert read_config(tmp_path / "ckpt").dtype == "bfloat16"
    config, restore = load_orbax_checkpoint(tmp_path / "ckpt")
    params = restore(config, None)
    assert params["lm_head"].dtype == jax.numpy.bfloat16
    assert params["cycles"]["layers"][0]["moe"]["router"].dtype == jax.numpy.float32  # kept as stored


@pytest.mark.parametrize("layout", ["original", "transformers"])
def test_small_slabs_and_chunks_round_trip(hf_model, tmp_path, monkeypatch, layout):
    """Force what only big models do: many slabs per tensor (an odd buffer size, so slabs end mid-row of the
    parameter) and one chunk file per cycle or (cycle, expert), so that one fused tensor spans chunk files."""
    import checkpoints_convert.background_writer
    import checkpoints_convert.orbax_checkpoint
    monkeypatch.setattr(checkpoints_convert.background_writer, "BUFFER_BYTES", 1000)
    monkeypatch.setattr(checkpoints_convert.orbax_checkpoint, "_MIN_CHUNK", 1000)
    src = save_layout(hf_model, tmp_path / "hf", layout, dtype="bfloat16", router_dtype="float32")
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt") == 0
    w1 = next((tmp_path / "ckpt" / "params").glob("*/cycles.layers.1.moe.w1"))
    assert sorted(f.name for f in w1.iterdir()) == [".zarray"] + [f"{c}.{e}.0.0" for c in range(2) for e in range(4)]
    config, restore = load_orbax_checkpoint(tmp_path / "ckpt")
    assert_trees_equal(jax.tree.map(np.asarray, restore(config, None)), expected_params(hf_model, ml_dtypes.bfloat16))
    assert convert("orbax-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "out") == 0
    original = save_layout(hf_model, tmp_path / "hf-original", "original", dtype="bfloat16", router_dtype="float32")
    assert_same_tensors(read_all(tmp_path / "out"), {n: t for n, t in read_all(original).items()
                                                     if not n.endswith(BUFFERS)})


def test_a_failed_write_leaves_nothing_behind(hf_model, tmp_path, monkeypatch):
    """A write error on the background thread (here: disk full) stops the conversion and removes the staging."""
    from checkpoints_convert.orbax_checkpoint import ChunkedArray

    def disk_full(self, data, offset):
        raise OSError(28, "No space left on device")

    src = save_layout(hf_model, tmp_path / "hf")
    monkeypatch.setattr(ChunkedArray, "pwrite", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_hf_to_orbax(src, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists() and not staging_path(tmp_path / "ckpt").exists()


def test_export_refuses_damaged_or_foreign_arrays(hf_model, tmp_path, capsys):
    """orbax-to-hf reads chunk files directly: a missing chunk or a layout it cannot map is a clear error."""
    src = save_layout(hf_model, tmp_path / "hf")
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt") == 0
    array = next((tmp_path / "ckpt" / "params").glob("*/cycles.layers.0.attn.qkv_proj"))
    (array / "0.0.0").rename(tmp_path / "chunk")
    assert convert("orbax-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "out") == 1
    assert "qkv_proj/0.0.0: chunk file missing" in capsys.readouterr().err
    (tmp_path / "chunk").rename(array / "0.0.0")
    meta = json.loads((array / ".zarray").read_text())
    (array / ".zarray").write_text(json.dumps({**meta, "compressor": {"id": "zstd", "level": 1}}))
    assert convert("orbax-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "out") == 1
    assert "expected a zarr2 array of uncompressed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_param_writer_refuses_an_incomplete_checkpoint(tmp_path):
    from checkpoints_convert.orbax_checkpoint import ParamWriter
    a, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5, np.float32)
    with pytest.raises(CheckpointError, match="2 parameter"):
        with ParamWriter(tmp_path, {("a",): (a.shape, a.dtype), ("b",): (b.shape, b.dtype)}) as writer:
            writer.write(writer.array(("a",)), 0, a[:2].reshape(-1).view(np.uint8))  # a in part, b not at all


# ---- the converted checkpoint works --------------------------------------------------------------
@pytest.mark.parametrize("layout", ["save_pretrained", "transformers"])
def test_converted_checkpoint_gives_transformers_logits(hf_model, tmp_path, layout):
    src = (save_hf_model(hf_model, tmp_path / "hf", max_shard_size="100KB") if layout == "save_pretrained"
           else save_layout(hf_model, tmp_path / "hf", "transformers"))
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt") == 0
    model = m1jax.from_pretrained(tmp_path / "ckpt")
    ids = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, (2, 13))
    want = hf_logits(hf_model, ids)
    assert np.abs(np.asarray(model(ids)) - want).max() <= 1e-5 * np.abs(want).max()


def test_orbax_restores_straight_into_shardings(hf_model, tmp_path):
    src = save_layout(hf_model, tmp_path / "hf", "transformers")
    config = m1jax.ModelConfig.from_hf(src)
    save_orbax_checkpoint(tmp_path / "ckpt", load_hf_checkpoint(src, config), config)  # the in-memory writer
    mesh = make_mesh(data=2, expert=4)
    shardings = param_shardings(config, mesh, announce=False)
    for params in (load_orbax_params(tmp_path / "ckpt", shardings),
                   params_of(m1jax.from_pretrained(tmp_path / "ckpt", mesh=mesh))):
        assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s, params, shardings))
        assert params["cycles"]["layers"][1]["moe"]["w1"].addressable_shards[0].data.shape[1] == 1  # 1 expert/device
        assert_trees_equal(jax.tree.map(np.asarray, params), expected_params(hf_model))


def test_export_loads_in_transformers_with_equal_logits(hf_model, tmp_path):
    src = save_layout(hf_model, tmp_path / "hf", "transformers")
    config = m1jax.ModelConfig.from_hf(src)
    save_orbax_checkpoint(tmp_path / "ckpt", load_hf_checkpoint(src, config), config)  # no hf_config.json kept
    assert convert("orbax-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "out") == 0
    assert m1jax.ModelConfig.from_hf(tmp_path / "out") == config.replace(rotary_dim=config.rotary)
    exported = MiniMaxForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, hf_model.config.vocab_size, (2, 11))
    np.testing.assert_allclose(hf_logits(exported, ids), hf_logits(hf_model, ids), rtol=0, atol=1e-6)


# ---- dry run on a full-size M1 index ------------------------------------------------------------
def full_size_m1(directory: Path) -> Path:
    """config.json and model.safetensors.index.json of M1 as architecture.md §9 describes them (no shards)."""
    L, E, d, I, V = 80, 32, 6144, 9216, 200_064
    shapes = {"model.embed_tokens.weight": [V, d], "model.norm.weight": [d], "lm_head.weight": [V, d]}
    for l in range(L):
        p = f"model.layers.{l}."
        shapes |= {p + "input_layernorm.weight": [d], p + "post_attention_layernorm.weight": [d],
                   p + "block_sparse_moe.gate.weight": [E, d]}
        if l % 8 == 7:
            shapes |= {p + "self_attn.q_proj.weight": [8192, d], p + "self_attn.k_proj.weight": [1024, d],
                       p + "self_attn.v_proj.weight": [1024, d], p + "self_attn.o_proj.weight": [d, 8192]}
        else:
            shapes |= {p + "self_attn.qkv_proj.weight": [24576, d], p + "self_attn.output_gate.weight": [8192, d],
                       p + "self_attn.norm.weight": [8192], p + "self_attn.out_proj.weight": [d, 8192]}
        shapes |= {f"{p}block_sparse_moe.experts.{e}.{w}.weight": [I, d] if w != "w2" else [d, I]
                   for e in range(E) for w in ("w1", "w2", "w3")}
    size = lambda n: math.prod(shapes[n]) * (4 if n.endswith("moe.gate.weight") else 2)  # fp32 router
    files = [f"model-{i:05d}-of-00413.safetensors" for i in range(413)]
    rest = [n for n in np.random.default_rng(0).permutation(sorted(shapes))
            if n not in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")]
    weight_map = {"model.embed_tokens.weight": files[0], "lm_head.weight": files[321], "model.norm.weight": files[321]}
    weight_map |= {n: files[1 + i % 412] for i, n in enumerate(rest)}  # layers scattered over many files
    directory.mkdir()
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(map(size, shapes))}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(PRESETS["minimax-m1-80k"].to_hf()))
    return directory


def test_dry_run_on_the_full_size_m1_index(tmp_path, capsys):
    src = full_size_m1(tmp_path / "m1")
    assert json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == 912_210_767_872
    assert convert("hf-to-orbax", "--src", src, "--dry-run", "--mesh", "data=2,expert=8,tensor=4") == 0
    out = capsys.readouterr().out
    assert ("8,243 tensors in 413 files, 912,210,767,872 bytes, 456,089,655,296 parameters "
            "(original layout, router float32)") in out
    assert "32 experts, 4 per expert shard" in out


def test_dry_run_lists_every_problem(tmp_path, capsys):
    src = full_size_m1(tmp_path / "m1")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.layers.42.block_sparse_moe.experts.3.w2.weight")
    index["weight_map"]["model.layers.80.input_layernorm.weight"] = "model-00007-of-00413.safetensors"
    index["metadata"]["total_size"] += 2
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert("hf-to-orbax", "--src", src, "--dry-run") == 1
    err = capsys.readouterr().err
    assert err.count("\n") >= 4 and "3 problem(s)" in err
    for needle in ("missing: model.layers.42.block_sparse_moe.experts.3.w2.weight",
                   "unexpected: model.layers.80.input_layernorm.weight (in model-00007-of-00413.safetensors)",
                   "total_size: the index says 912,210,767,874 bytes"):
        assert needle in err


def test_dry_run_with_shards_reads_their_headers(hf_model, tmp_path, capsys):
    src = save_hf_model(hf_model, tmp_path / "hf", max_shard_size="100KB")
    assert convert("hf-to-orbax", "--src", src, "--dry-run") == 0
    assert "router float32" in capsys.readouterr().out
    assert not (tmp_path / "ckpt").exists()


# ---- destination safety -------------------------------------------------------------------------
def test_refuses_a_non_empty_destination_unless_overwrite(hf_model, tmp_path, capsys):
    src = save_layout(hf_model, tmp_path / "hf")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "precious.txt").write_text("keep")
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt") == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "ckpt" / "precious.txt").exists()
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt", "--overwrite") == 0
    assert is_orbax_checkpoint(tmp_path / "ckpt") and not (tmp_path / "ckpt" / "precious.txt").exists()


def test_a_bad_source_leaves_nothing_behind(hf_model, tmp_path, capsys):
    src = save_layout(hf_model, tmp_path / "hf")
    (src / sorted(src.glob("*.safetensors"))[1].name).write_bytes(b"\0" * 4)
    assert convert("hf-to-orbax", "--src", src, "--dst", tmp_path / "ckpt") == 1
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not staging_path(tmp_path / "ckpt").exists()


def test_interrupted_conversion_leaves_no_checkpoint_and_a_rerun_succeeds(tmp_path):
    model = random_hf_model(hf_config(PATTERN * 2, experts=4, intermediate_size=48), seed=7)
    src = save_layout(model, tmp_path / "hf", "transformers")
    dst = tmp_path / "ckpt"
    standins = staging_path(dst) / "params" / "_CHECKPOINT_METADATA"  # orbax's part done, the arrays not yet
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "checkpoints_convert.cli", "hf-to-orbax", "--src", str(src),
                             "--dst", str(dst), "--no-progress"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not standins.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # mid-way: a committed orbax checkpoint of stand-ins, few parameters written
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert staging_path(dst).exists() and not dst.exists() and not is_orbax_checkpoint(dst)
    assert not is_orbax_checkpoint(staging_path(dst))  # orbax's part is committed, but it is no m1jax checkpoint
    convert_hf_to_orbax(src, dst, progress=False)  # the rerun discards the leftovers
    assert is_orbax_checkpoint(dst) and not staging_path(dst).exists()
    config, restore = load_orbax_checkpoint(dst)
    assert_trees_equal(jax.tree.map(np.asarray, restore(config, None)), expected_params(model))


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert not is_orbax_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a complete m1jax orbax checkpoint"):
        read_config(tmp_path / "empty")


def test_storage_chunks_follow_cycles_and_experts_at_m1_scale():
    """Big stacked parameters are chunked per (cycle, expert) or per cycle; small ones stay one chunk."""
    from checkpoints_convert.orbax_checkpoint import chunk_split
    path = lambda *keys: ("cycles", "layers", 0) + keys
    assert chunk_split(path("moe", "w2"), (10, 32, 9216, 6144), 2) == 2
    assert chunk_split(path("attn", "qkv_proj"), (10, 6144, 24576), 2) == 1
    assert chunk_split(path("moe", "w1"), (2, 32, 1024, 256), 2) == 1
    assert chunk_split(path("moe", "w1"), (2, 4, 64, 96), 2) == 0
    assert chunk_split(("embed_tokens",), (200_064, 6144), 2) == 0
