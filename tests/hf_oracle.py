"""Tiny random transformers MiniMaxForCausalLM models: the parity oracle (architecture.md §14).

Weights are re-drawn at a realistic scale (std 1/sqrt(fan_in)): transformers' 0.02 init makes attention nearly
uniform and hides errors. `rotary_dim = head_dim`, since transformers ignores partial rotary.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import MiniMaxConfig, MiniMaxForCausalLM

KINDS = {"lightning": "linear_attention", "softmax": "full_attention"}


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
