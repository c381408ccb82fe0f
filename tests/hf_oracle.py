"""Tiny random transformers MiniMaxForCausalLM models: the parity oracle (architecture.md §14).

Weights are re-drawn at a realistic scale (std 1/sqrt(fan_in)): transformers' 0.02 init makes attention nearly
uniform and hides errors. `rotary_dim = head_dim`, since transformers ignores partial rotary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MiniMaxConfig, MiniMaxForCausalLM

KINDS = {"lightning": "linear_attention", "softmax": "full_attention"}
BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_config(layer_types=("lightning", "lightning", "lightning", "softmax"), *, block_size=4, vocab_size=128,
              hidden_size=64, heads=4, kv_heads=2, head_dim=16, intermediate_size=48, experts=4, top_k=2,
              hidden_act="silu", rope_theta=1e7, tie_word_embeddings=False) -> MiniMaxConfig:
    alpha = (2 * len(layer_types)) ** 0.25
    cfg = MiniMaxConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=len(layer_types), num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, layer_types=[KINDS[t] for t in layer_types], block_size=block_size,
        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=4096, rms_norm_eps=1e-5,
        hidden_act=hidden_act, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        full_attn_alpha_factor=alpha, linear_attn_alpha_factor=alpha, mlp_alpha_factor=alpha,
        full_attn_beta_factor=1.0, linear_attn_beta_factor=1.0, mlp_beta_factor=1.0,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    cfg._experts_implementation = "eager"
    return cfg


def random_hf_model(config: MiniMaxConfig, seed: int = 0) -> MiniMaxForCausalLM:
    """A model in fp32 eval mode with every weight drawn from N(0, 1/fan_in) (norm weights near 1)."""
    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


def save_hf_model(model: MiniMaxForCausalLM, directory: Path, max_shard_size: str | None = None) -> Path:
    """save_pretrained writes the original per-expert tensor names (and the decay buffers m1jax ignores)."""
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kw)
    return directory


def hf_logits(model: MiniMaxForCausalLM, input_ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(input_ids), attention_mask=None if attention_mask is None
                    else torch.as_tensor(attention_mask), position_ids=None if position_ids is None
                    else torch.as_tensor(position_ids))
    return out.logits.float().numpy()


# ---- writing HF checkpoints by hand: either tensor layout, scattered over shards like M1's ---------
def hf_tensors(model, layout="original", dtype="float32", router_dtype="float32") -> dict[str, torch.Tensor]:
    """The model's tensors under `layout`'s names, cast (router separately), decay buffers included."""
    I = model.config.intermediate_size
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(BUFFERS):
            out[name] = t
        elif name.endswith("mlp.gate.weight"):
            key = name if layout == "transformers" else name.replace(".mlp.", ".block_sparse_moe.")
            out[key] = t.to(TORCH_DTYPES[router_dtype])
        elif layout == "original" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = name.rsplit(".mlp.", 1)[0] + ".block_sparse_moe.experts"
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    out[f"{prefix}.{e}.w1.weight"] = t[e, :I].to(TORCH_DTYPES[dtype])
                    out[f"{prefix}.{e}.w3.weight"] = t[e, I:].to(TORCH_DTYPES[dtype])
                else:
                    out[f"{prefix}.{e}.w2.weight"] = t[e].to(TORCH_DTYPES[dtype])
        else:
            out[name] = t.to(TORCH_DTYPES[dtype])
    return {k: v.contiguous() for k, v in out.items()}


def write_checkpoint(directory, tensors: dict, config: dict, shards: int = 3):
    """Scatter tensors over `shards` files (round robin, so layers span files) with an index, like M1's."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(sorted(tensors))}
    for file in files:
        save_file({n: t for n, t in tensors.items() if weight_map[n] == file}, directory / file,
                  metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def save_layout(model, directory, layout="original", dtype="float32", router_dtype="float32", shards=3):
    config = {**model.config.to_dict(), "dtype": dtype}
    return write_checkpoint(directory, hf_tensors(model, layout, dtype, router_dtype), config, shards)
