"""ModelConfig: every field the MiniMax-M1 / MiniMax-Text-01 network uses, presets, and reading HF config.json.

Both published config.json layouts are read (architecture.md §2): the original remote-code one
(`attn_type_list`, `layernorm_*_alpha/beta`, `rotary_dim`, `postnorm`, `rope_theta`) and transformers'
(`layer_types`, `*_attn_alpha_factor`, `mlp_*_factor`, `rope_parameters`, `block_size`). A field that would
change the math and is not implemented is refused with an error naming it; unknown harmless fields are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp

LayerType = Literal["lightning", "softmax"]
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")
LIGHTNING_IMPLS = ("auto", "reference", "xla", "pallas_gpu", "pallas_tpu")
M1_ALPHA = (2 * 80) ** 0.25  # DeepNorm alpha of the 80-layer model: 3.5565588200778455


class ConfigError(ValueError):
    """A config value the model cannot run with."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The MiniMax-M1 network. Defaults are M1's values where a default makes sense."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[LayerType, ...]
    intermediate_size: int  # per-expert FFN width
    num_experts: int
    num_experts_per_tok: int = 2
    block_size: int = 256  # lightning chunk size; a tiling choice, exact in real arithmetic
    rotary_dim: int | None = None  # None: rotate all head_dim dims
    rope_theta: float = 10_000_000.0
    linear_attn_alpha: float = 1.0
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = 1.0
    full_attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    postnorm: bool = True
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 10_240_000
    dtype: str = "bfloat16"
    lightning_impl: str = "auto"  # execution choice only: which lightning_attention implementation runs
    eos_token_id: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise ConfigError(f"ModelConfig.{field}: {msg}")

        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "num_experts", "num_experts_per_tok", "block_size"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
                 f"must be a positive int, got {getattr(self, f)!r}")
        need(len(self.layer_types) == self.num_layers, "layer_types",
             f"has {len(self.layer_types)} entries for num_layers={self.num_layers}")
        bad = sorted({t for t in self.layer_types if t not in ("lightning", "softmax")})
        need(not bad, "layer_types", f"unknown layer type(s) {bad}; expected 'lightning' or 'softmax'")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} > num_experts={self.num_experts}")
        need(self.rotary_dim is None or (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0),
             "rotary_dim", f"must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        need(self.hidden_act in ACTIVATIONS, "hidden_act", f"{self.hidden_act!r} not in {ACTIVATIONS}")
        need(self.dtype in DTYPES, "dtype", f"{self.dtype!r} not in {DTYPES}")
        need(self.lightning_impl in LIGHTNING_IMPLS, "lightning_impl",
             f"{self.lightning_impl!r} not in {LIGHTNING_IMPLS}")
        need(self.rms_norm_eps > 0 and self.lightning_norm_eps > 0, "rms_norm_eps", "norm epsilons must be > 0")

    # ---- derived quantities -----------------------------------------------------------------
    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def rotary(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def cycle(self) -> tuple[LayerType, ...]:
        """The shortest period of the layer pattern: the unit the layer stack is scanned over."""
        n = self.num_layers
        for p in range(1, n + 1):
            if n % p == 0 and self.layer_types == self.layer_types[:p] * (n // p):
                return self.layer_types[:p]
        raise AssertionError("unreachable")

    @property
    def num_cycles(self) -> int:
        return self.num_layers // len(self.cycle)

    def residual_scales(self, layer_type: LayerType) -> tuple[float, float, float, float]:
        """(attention alpha, attention beta, mlp alpha, mlp beta) for a layer of this type."""
        if layer_type == "lightning":
            return self.linear_attn_alpha, self.linear_attn_beta, self.mlp_alpha, self.mlp_beta
        return self.full_attn_alpha, self.full_attn_beta, self.mlp_alpha, self.mlp_beta

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {unknown}")
        return cls(**d)

    @classmethod
    def from_hf(cls, source: str | Path | dict, **overrides) -> "ModelConfig":
        """Read a Hugging Face config.json (a path, a directory holding one, or the parsed dict)."""
        if isinstance(source, dict):
            hf, where = dict(source), "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.exists():
                raise ConfigError(f"{path}: no such config file")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            where = str(path)
        try:
            return cls(**{**_fields_from_hf(hf), **overrides})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """config.json in the original remote-code layout (what the official checkpoints ship)."""
        return {
            "architectures": ["MiniMaxM1ForCausalLM"],
            "model_type": "minimax_m1",
            "attn_type_list": [0 if t == "lightning" else 1 for t in self.layer_types],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rope_theta": self.rope_theta,
            "rotary_dim": self.rotary,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "layernorm_linear_attention_alpha": self.linear_attn_alpha,
            "layernorm_linear_attention_beta": self.linear_attn_beta,
            "layernorm_full_attention_alpha": self.full_attn_alpha,
            "layernorm_full_attention_beta": self.full_attn_beta,
            "layernorm_mlp_alpha": self.mlp_alpha,
            "layernorm_mlp_beta": self.mlp_beta,
            "postnorm": self.postnorm,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "shared_intermediate_size": 0,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "block_size": self.block_size,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.dtype,
        }


def _fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Map either published config.json layout onto ModelConfig fields, refusing unimplemented math."""

    def refuse(field: str, value, why: str):
        raise ConfigError(f"field {field}={value!r} is not supported: {why}")

    if hf.get("shared_intermediate_size", 0):
        refuse("shared_intermediate_size", hf["shared_intermediate_size"], "shared experts are not implemented")
    if hf.get("sliding_window") is not None:
        refuse("sliding_window", hf["sliding_window"], "M1 has no sliding window; not implemented")
    if hf.get("attention_dropout", 0.0):
        refuse("attention_dropout", hf["attention_dropout"], "attention dropout is not implemented")
    if hf.get("router_jitter_noise", 0.0):
        refuse("router_jitter_noise", hf["router_jitter_noise"], "router jitter is not implemented")
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        refuse("attention_bias/mlp_bias", True, "M1 has no biases")

    layers = hf.get("num_hidden_layers")
    if "attn_type_list" in hf:
        layer_types = ["lightning" if t == 0 else "softmax" if t == 1 else refuse("attn_type_list", t, "not 0/1")
                       for t in hf["attn_type_list"]]
    elif hf.get("layer_types") is not None:
        kinds = {"linear_attention": "lightning", "full_attention": "softmax"}
        layer_types = [kinds.get(t) or refuse("layer_types", t, "expected linear_attention/full_attention")
                       for t in hf["layer_types"]]
    else:
        raise ConfigError("neither attn_type_list nor layer_types is given: the layer pattern must be explicit "
                          "(transformers' default alternates starting with full attention, which M1 is not)")

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters.rope_type", rope.get("rope_type", rope.get("type")), "only default RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
    heads = hf.get("num_attention_heads", 32)
    head_dim = hf.get("head_dim") or hf.get("hidden_size", 4096) // heads
    rotary_dim = hf.get("rotary_dim")
    if rotary_dim is None and "partial_rotary_factor" in rope:
        rotary_dim = int(round(rope["partial_rotary_factor"] * head_dim))

    def pair(orig: str, port: str, default=1.0):
        return hf.get(orig, hf.get(port, default))

    eos = hf.get("eos_token_id")
    return dict(
        vocab_size=hf.get("vocab_size", 32000),
        hidden_size=hf.get("hidden_size", 4096),
        num_layers=layers if layers is not None else len(layer_types),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", 8),
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        intermediate_size=hf.get("intermediate_size", 14336),
        num_experts=hf.get("num_local_experts", hf.get("num_experts", 8)),
        num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        block_size=hf.get("block_size", hf.get("block", 256)),
        rotary_dim=rotary_dim,
        rope_theta=float(theta),
        linear_attn_alpha=pair("layernorm_linear_attention_alpha", "linear_attn_alpha_factor"),
        linear_attn_beta=pair("layernorm_linear_attention_beta", "linear_attn_beta_factor"),
        full_attn_alpha=pair("layernorm_full_attention_alpha", "full_attn_alpha_factor"),
        full_attn_beta=pair("layernorm_full_attention_beta", "full_attn_beta_factor"),
        mlp_alpha=pair("layernorm_mlp_alpha", "mlp_alpha_factor"),
        mlp_beta=pair("layernorm_mlp_beta", "mlp_beta_factor"),
        # The transformers port is always post-norm and drops the key; the original defaults to False.
        postnorm=hf.get("postnorm", "layer_types" in hf and "attn_type_list" not in hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        hidden_act=hf.get("hidden_act", "silu"),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 10_240_000),
        dtype=_hf_dtype(hf.get("torch_dtype", hf.get("dtype"))),
        eos_token_id=eos if isinstance(eos, int) else None,
    )


def _hf_dtype(name) -> str:
    name = str(name or "float32").replace("torch.", "")  # transformers loads float32 when unstated
    return {"bf16": "bfloat16", "fp32": "float32", "float": "float32", "half": "float16"}.get(name, name)


# ---- presets ----------------------------------------------------------------------------------
def _m1_pattern(num_layers: int, period: int = 8) -> tuple[LayerType, ...]:
    return tuple("softmax" if i % period == period - 1 else "lightning" for i in range(num_layers))


def _m1_like(num_layers: int, **kw) -> ModelConfig:
    alpha = (2 * num_layers) ** 0.25
    kw.setdefault("layer_types", _m1_pattern(num_layers))
    return ModelConfig(num_layers=num_layers, linear_attn_alpha=alpha, full_attn_alpha=alpha, mlp_alpha=alpha,
                       **kw)


_M1 = dict(vocab_size=200_064, hidden_size=6144, num_heads=64, num_kv_heads=8, head_dim=128,
           intermediate_size=9216, num_experts=32, num_experts_per_tok=2, rotary_dim=64,
           rope_theta=10_000_000.0, max_position_embeddings=10_240_000, eos_token_id=200_020)

PRESETS: dict[str, ModelConfig] = {
    "minimax-m1-40k": _m1_like(80, **_M1),
    "minimax-m1-80k": _m1_like(80, **_M1),
    "minimax-text-01": _m1_like(80, **_M1),
    # The 1.5B M1-shaped model the anchors in reference/measured.md were measured on.
    "m1-1.5b": _m1_like(8, vocab_size=32_000, hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                        intermediate_size=3072, num_experts=8, rotary_dim=64, max_position_embeddings=1 << 20),
    # Small M1-architecture models for demos and tests: both layer kinds, several experts, partial RoPE.
    "m1-small": _m1_like(8, vocab_size=512, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                         intermediate_size=256, num_experts=4, rotary_dim=16, block_size=64,
                         max_position_embeddings=8192, dtype="float32"),
    "m1-tiny": _m1_like(4, layer_types=_m1_pattern(4, period=4), vocab_size=128, hidden_size=64, num_heads=4,
                        num_kv_heads=2, head_dim=16, intermediate_size=96, num_experts=4, rotary_dim=8,
                        block_size=8, max_position_embeddings=4096, dtype="float32"),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (float64), including the non-power-of-two interleave (architecture.md §5.2)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]
