"""ModelConfig: presets, both HF config.json layouts, refusals, parameter accounting."""

import json

import pytest

from m1jax.config import PRESETS, ConfigError, ModelConfig, alibi_slopes, get_preset
from m1jax.model import parameter_counts

M1_ORIGINAL = {  # the fields of MiniMax-M1's config.json (architecture.md §2.1)
    "architectures": ["MiniMaxM1ForCausalLM"], "attn_type_list": [1 if i % 8 == 7 else 0 for i in range(80)],
    "hidden_size": 6144, "intermediate_size": 9216, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rope_theta": 10000000, "rotary_dim": 64,
    "max_position_embeddings": 10240000, "rms_norm_eps": 1e-05,
    "layernorm_linear_attention_alpha": 3.5565588200778455, "layernorm_linear_attention_beta": 1.0,
    "layernorm_full_attention_alpha": 3.5565588200778455, "layernorm_full_attention_beta": 1.0,
    "layernorm_mlp_alpha": 3.5565588200778455, "layernorm_mlp_beta": 1.0, "postnorm": True,
    "num_local_experts": 32, "num_experts_per_tok": 2, "shared_intermediate_size": 0, "shared_moe_mode": "sigmoid",
    "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "output_router_logits": False,
    "sliding_window": None, "attention_dropout": 0.0, "initializer_range": 0.02, "vocab_size": 200064,
    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "torch_dtype": "bfloat16",
    "model_type": "minimax_m1", "transformers_version": "4.45.2",
}


def to_transformers_layout(orig: dict) -> dict:
    """The renames the -hf repositories applied (architecture.md §2.2)."""
    hf = {k: v for k, v in orig.items() if not k.startswith("layernorm_") and k not in ("attn_type_list", "rope_theta")}
    hf["layer_types"] = ["full_attention" if t else "linear_attention" for t in orig["attn_type_list"]]
    for o, p in (("linear_attention", "linear_attn"), ("full_attention", "full_attn"), ("mlp", "mlp")):
        hf[f"{p}_alpha_factor"] = orig[f"layernorm_{o}_alpha"]
        hf[f"{p}_beta_factor"] = orig[f"layernorm_{o}_beta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": orig["rope_theta"]}
    hf["block_size"] = 256
    del hf["postnorm"]  # the port hard-wires post-norm and drops the key
    return hf


@pytest.mark.parametrize("layout", ["original", "transformers"])
def test_from_hf_reads_the_real_m1_config(tmp_path, layout):
    raw = M1_ORIGINAL if layout == "original" else to_transformers_layout(M1_ORIGINAL)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_hf(tmp_path)
    preset = get_preset("minimax-m1-80k")
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "layer_types",
                  "intermediate_size", "num_experts", "num_experts_per_tok", "block_size", "rope_theta",
                  "linear_attn_alpha", "full_attn_alpha", "mlp_alpha", "mlp_beta", "postnorm", "rms_norm_eps",
                  "lightning_norm_eps", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.rotary == 64 if layout == "original" else cfg.rotary in (64, 128)
    assert cfg.cycle == ("lightning",) * 7 + ("softmax",) and cfg.num_cycles == 10


def test_head_dim_is_read_not_derived():
    cfg = ModelConfig.from_hf(M1_ORIGINAL)
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_heads


def test_partial_rotary_factor_is_read():
    raw = to_transformers_layout(M1_ORIGINAL)
    raw["rope_parameters"]["partial_rotary_factor"] = 0.5
    assert ModelConfig.from_hf(raw).rotary == 64


@pytest.mark.parametrize("field,value", [("shared_intermediate_size", 1024), ("sliding_window", 4096),
                                         ("attention_dropout", 0.1), ("router_jitter_noise", 0.01)])
def test_unimplemented_math_is_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf({**M1_ORIGINAL, field: value})


def test_missing_layer_pattern_is_refused():
    raw = {k: v for k, v in M1_ORIGINAL.items() if k != "attn_type_list"}
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_hf(raw)


def test_unknown_harmless_fields_are_ignored():
    assert ModelConfig.from_hf({**M1_ORIGINAL, "some_future_field": 3}).num_layers == 80


@pytest.mark.parametrize("changes,field", [({"num_kv_heads": 3}, "num_kv_heads"), ({"rotary_dim": 7}, "rotary_dim"),
                                           ({"layer_types": ("lightning",) * 3}, "layer_types"),
                                           ({"hidden_act": "swish2"}, "hidden_act"), ({"dtype": "int8"}, "dtype")])
def test_bad_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        get_preset("m1-tiny").replace(**changes)


def test_bad_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)


def test_round_trip_through_the_original_layout():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name


def test_m1_parameter_counts():
    """456.1B total and 45.9B active per token (excluding embeddings and LM head), within 0.5%."""
    for name in ("minimax-m1-40k", "minimax-m1-80k", "minimax-text-01"):
        counts = parameter_counts(get_preset(name))
        assert abs(counts["total"] / 456.1e9 - 1) < 0.005
        assert abs(counts["active"] / 45.9e9 - 1) < 0.005


def test_alibi_slopes():
    s = alibi_slopes(64)
    assert s[0] == pytest.approx(2 ** (-1 / 8)) and s[7] == pytest.approx(0.5) and s[63] == pytest.approx(2 ** -8)
    assert alibi_slopes(6) == pytest.approx(alibi_slopes(4) + alibi_slopes(8)[0::2][:2])
