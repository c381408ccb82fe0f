"""m1jax.weights: HF tensor names <-> parameters for both layouts, streaming loads, export, and bad checkpoints.

The tensors come from tiny random transformers models; the name mapping below is an independent transcription
of architecture.md §9.4 (what transformers' conversion_mapping does), used as the oracle.
"""

import json
import math
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.torch import save_file

from hf_oracle import BUFFERS, hf_config, random_hf_model, save_hf_model, save_layout
from m1jax import PRESETS, abstract_params, get_preset
from m1jax.config import ModelConfig
from m1jax.weights import (CheckpointError, copy_block, hf_tensor_specs, iter_hf_tensors, load_hf_checkpoint,
                           param_specs, read_safetensors_header, row_slabs, scan_checkpoint)

PATTERN = ("lightning", "lightning", "softmax") * 2  # cycle of 3, two cycles: stacking over cycles is exercised


def read_all(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(hf_config(PATTERN, experts=4, intermediate_size=48), seed=3)


def expected_params(model, dtype=np.float32) -> dict:
    """The parameter tree built directly from transformers' in-memory (fused) tensors: the oracle."""
    cfg = ModelConfig.from_hf(model.config.to_dict())
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    I, P = cfg.intermediate_size, len(cfg.cycle)
    T = lambda a: np.swapaxes(a, -1, -2)
    layers = {}
    for j, kind in enumerate(cfg.cycle):
        per = [f"model.layers.{c * P + j}." for c in range(cfg.num_cycles)]
        stack = lambda f, dt=dtype: np.stack([f(p) for p in per]).astype(dt)
        attn = (("qkv_proj", "output_gate", "out_proj") if kind == "lightning" else
                ("q_proj", "k_proj", "v_proj", "o_proj"))
        layers[j] = {
            "input_norm": {"weight": stack(lambda p: sd[p + "input_layernorm.weight"])},
            "post_attention_norm": {"weight": stack(lambda p: sd[p + "post_attention_layernorm.weight"])},
            "attn": {w: stack(lambda p, w=w: T(sd[p + f"self_attn.{w}.weight"])) for w in attn},
            "moe": {"router": stack(lambda p: T(sd[p + "mlp.gate.weight"]), np.float32),
                    "w1": stack(lambda p: T(sd[p + "mlp.experts.gate_up_proj"][:, :I])),
                    "w3": stack(lambda p: T(sd[p + "mlp.experts.gate_up_proj"][:, I:])),
                    "w2": stack(lambda p: T(sd[p + "mlp.experts.down_proj"]))}}
        if kind == "lightning":
            layers[j]["attn"]["norm"] = stack(lambda p: sd[p + "self_attn.norm.weight"])
    return {"embed_tokens": sd["model.embed_tokens.weight"].astype(dtype), "cycles": {"layers": layers},
            "final_norm": {"weight": sd["model.norm.weight"].astype(dtype)},
            "lm_head": T(sd["lm_head.weight"]).astype(dtype)}


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        a = np.asarray(a)
        assert a.shape == b.shape and a.dtype == b.dtype, (jax.tree_util.keystr(path), a.shape, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# ---- the mapping --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["m1-tiny", "m1-small", "tied"])
def test_param_specs_match_the_model(name):
    config = get_preset("m1-tiny").replace(tie_word_embeddings=True) if name == "tied" else get_preset(name)
    model = {tuple(getattr(k, "key", k) for k in kp): (a.shape, np.dtype(a.dtype))
             for kp, a in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
    ours = {s.path: (s.shape, s.dtype) for s in param_specs(config)}
    assert ours == model


def test_tensor_specs_name_every_transformers_tensor(hf_model, tmp_path):
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    fused = {n: tuple(t.shape) for n, t in hf_model.state_dict().items() if not n.endswith(BUFFERS)}
    assert {n: s for n, (s, _) in hf_tensor_specs(config, "transformers").items()} == fused
    saved = scan_checkpoint(save_hf_model(hf_model, tmp_path / "hf"))  # save_pretrained: the original names
    on_disk = {n: t.shape for n, t in saved.items() if not n.endswith(BUFFERS)}
    assert {n: s for n, (s, _) in hf_tensor_specs(config, "original").items()} == on_disk


def test_full_size_m1_has_8243_tensors_of_912_gb():
    specs = hf_tensor_specs(PRESETS["minimax-m1-80k"])
    assert len(specs) == 8243
    assert sum(math.prod(s) * d.itemsize for s, d in specs.values()) == 912_210_767_872
    assert specs["model.layers.7.self_attn.k_proj.weight"][0] == (1024, 6144)
    assert specs["model.layers.79.block_sparse_moe.gate.weight"] == ((32, 6144), np.float32)


# ---- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["original", "transformers"])
def test_load_both_layouts(hf_model, tmp_path, layout, dtype):
    directory = save_layout(hf_model, tmp_path / layout, layout, dtype=np.dtype(dtype).name)
    config = ModelConfig.from_hf(directory)
    assert_trees_equal(load_hf_checkpoint(directory, config), expected_params(hf_model, dtype))


@pytest.mark.parametrize("shape,transposed", [((7,), False), ((5, 9), False), ((5, 9), True), ((3, 5, 9), False),
                                             ((3, 5, 9), True)])
@pytest.mark.parametrize("max_items", [1, 4, 10, 1000])
def test_row_slabs_rebuild_the_block(shape, transposed, max_items):
    """The streaming writers copy each block slab by slab: the slabs tile the block exactly once, in C order."""
    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = np.swapaxes(src, -1, -2) if transposed else src
    got, covered = np.zeros(want.size, np.float32), np.zeros(want.size, int)
    for first, part in row_slabs(src, transposed, max_items):
        slab = np.empty(part.shape[::-1] if transposed else part.shape, np.float32)
        copy_block(slab, part, transposed)
        assert slab.size <= max(max_items, want.shape[-1])  # within the budget, or a single row
        got[first:first + slab.size] = slab.ravel()
        covered[first:first + slab.size] += 1
    assert (covered == 1).all()
    np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_load_save_pretrained_output(hf_model, tmp_path):
    directory = save_hf_model(hf_model, tmp_path / "hf", max_shard_size="50KB")  # many shards, decay buffers
    assert len(list(directory.glob("*.safetensors"))) > 3
    assert_trees_equal(load_hf_checkpoint(directory, ModelConfig.from_hf(directory)), expected_params(hf_model))


def test_dtype_cast_and_router_keeps_its_stored_dtype(hf_model, tmp_path):
    directory = save_layout(hf_model, tmp_path / "bf16", "original", dtype="bfloat16", router_dtype="float32")
    config = ModelConfig.from_hf(directory)
    assert config.dtype == "bfloat16"
    params = load_hf_checkpoint(directory, config)
    moe = params["cycles"]["layers"][0]["moe"]
    assert moe["w1"].dtype == ml_dtypes.bfloat16 and moe["router"].dtype == np.float32
    want = expected_params(hf_model)
    np.testing.assert_array_equal(moe["router"], want["cycles"]["layers"][0]["moe"]["router"])
    np.testing.assert_array_equal(moe["w2"], want["cycles"]["layers"][0]["moe"]["w2"].astype(ml_dtypes.bfloat16))
    as_f32 = load_hf_checkpoint(directory, config, dtype="float32", router_dtype="bfloat16")
    assert as_f32["embed_tokens"].dtype == np.float32
    assert as_f32["cycles"]["layers"][1]["moe"]["router"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(as_f32["lm_head"], params["lm_head"].astype(np.float32))


def test_load_places_parameters_into_shardings(hf_model, tmp_path):
    directory = save_layout(hf_model, tmp_path / "hf", "transformers")
    config = ModelConfig.from_hf(directory)
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    expert = NamedSharding(mesh, PartitionSpec(None, "expert"))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree_util.tree_map_with_path(
        lambda kp, _: expert if getattr(kp[-1], "key", None) in ("w1", "w2", "w3") else replicated,
        abstract_params(config))
    params = load_hf_checkpoint(directory, config, shardings=shardings)
    w2 = params["cycles"]["layers"][2]["moe"]["w2"]
    assert isinstance(w2, jax.Array) and w2.sharding == expert
    assert w2.addressable_shards[0].data.shape == (2, 1, 48, 64)
    assert_trees_equal(jax.tree.map(np.asarray, params), expected_params(hf_model))


def test_iter_hf_tensors_inverts_loading_bit_exactly(hf_model, tmp_path):
    directory = save_layout(hf_model, tmp_path / "bf16", "original", dtype="bfloat16", router_dtype="float32")
    params = load_hf_checkpoint(directory, ModelConfig.from_hf(directory))
    source = {n: t for n, t in read_all(directory).items() if not n.endswith(BUFFERS)}
    exported = dict(iter_hf_tensors(params, ModelConfig.from_hf(directory)))
    assert list(exported) != sorted(exported)  # parameter order, not name order
    assert set(exported) == set(source)
    for name, t in source.items():
        got = torch.from_numpy(exported[name].view(np.uint16)).view(torch.bfloat16) \
            if exported[name].dtype == ml_dtypes.bfloat16 else torch.from_numpy(exported[name])
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


# ---- bad checkpoints: one clear error naming the file and the tensor ----------------------------
def _tiny(tmp_path):
    model = random_hf_model(hf_config(("lightning", "softmax"), experts=2, intermediate_size=32), seed=1)
    return save_layout(model, tmp_path / "hf", "original", shards=3), model


def _file_of(directory, name):
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]


def _rewrite(directory, file, change):
    from safetensors.torch import load_file
    tensors = load_file(directory / file)
    change(tensors)
    save_file(tensors, directory / file, metadata={"format": "pt"})


def _set_index(directory, change):
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


W3 = "model.layers.1.block_sparse_moe.experts.1.w3.weight"
QKV = "model.layers.0.self_attn.qkv_proj.weight"


def _missing(d):
    _rewrite(d, _file_of(d, W3), lambda t: t.pop(W3))
    _set_index(d, lambda m: m.pop(W3))
    return [W3, "missing"]


def _unexpected(d):
    file = _file_of(d, QKV)
    _rewrite(d, file, lambda t: t.update({"model.layers.0.self_attn.bias": torch.ones(3)}))
    _set_index(d, lambda m: m.update({"model.layers.0.self_attn.bias": file}))
    return ["model.layers.0.self_attn.bias", file, "unexpected"]


def _misshaped(d):
    _rewrite(d, _file_of(d, QKV), lambda t: t.update({QKV: torch.ones(96, 64)}))
    return [QKV, _file_of(d, QKV), "[96, 64]", "[192, 64]"]


def _integer_dtype(d):
    _rewrite(d, _file_of(d, QKV), lambda t: t.update({QKV: torch.ones(192, 64, dtype=torch.int32)}))
    return [QKV, _file_of(d, QKV), "I32"]


def _config_disagrees(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "hidden_size": 32, "head_dim": 8}))
    return ["config.json disagrees", QKV, "[192, 64]", "[96, 32]"]


def _truncated(d):
    file = d / _file_of(d, QKV)
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    last = max(read_safetensors_header_of(data).items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
    return [file.name, last, "truncated"]


def _header_lies(d):
    file = d / _file_of(d, QKV)
    data = bytearray(file.read_bytes())
    header = read_safetensors_header_of(data)
    begin, end = header[QKV]["data_offsets"]
    header[QKV]["data_offsets"] = [begin, end - 4]
    _write_header(file, data, header)
    return [file.name, QKV, "needs"]


def _corrupt_header(d):
    file = d / _file_of(d, QKV)
    data = bytearray(file.read_bytes())
    data[8:20] = b"{{{{{{{{{{{{"
    file.write_bytes(bytes(data))
    return [file.name, "corrupt"]


def _missing_shard(d):
    file = _file_of(d, QKV)
    (d / file).unlink()
    return [file, "missing", QKV]


def _index_lies(d):
    other = next(f for f in set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
                 if f != _file_of(d, QKV))
    _set_index(d, lambda m: m.update({QKV: other}))
    return [QKV, other, "does not contain"]


def read_safetensors_header_of(data) -> dict:
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    return {k: v for k, v in json.loads(bytes(data[8:8 + n])).items() if k != "__metadata__"}


def _write_header(file, data, header):
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    file.write_bytes(bytes(data[:8]) + raw + bytes(data[8 + n:]))


@pytest.mark.parametrize("damage", [_missing, _unexpected, _misshaped, _integer_dtype, _config_disagrees, _truncated,
                                    _header_lies, _corrupt_header, _missing_shard, _index_lies],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_checkpoint_raises_one_clear_error(tmp_path, damage):
    directory, _ = _tiny(tmp_path)
    load_hf_checkpoint(directory, ModelConfig.from_hf(directory))  # intact: loads
    needles = damage(directory)
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(directory, ModelConfig.from_hf(directory))
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_several_problems_are_listed_together(tmp_path):
    directory, _ = _tiny(tmp_path)
    needles = _missing(directory) + _unexpected(directory) + _misshaped(directory)
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(directory, ModelConfig.from_hf(directory))
    message = str(info.value)
    assert "3 problem(s)" in message and all(n in message for n in needles)


def test_header_reader_refuses_a_huge_header_length(tmp_path):
    file = tmp_path / "x.safetensors"
    file.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="x.safetensors: header length"):
        read_safetensors_header(file)
