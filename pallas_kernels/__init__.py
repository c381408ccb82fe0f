"""Pallas kernels for m1jax, each with a reference and an XLA fallback beside it."""

from pallas_kernels.expert_matmul import expert_matmul
from pallas_kernels.grouped_matmul import Tiling, grouped_matmul
from pallas_kernels.lightning import lightning_attention, lightning_decode_step

__all__ = ["Tiling", "expert_matmul", "grouped_matmul", "lightning_attention", "lightning_decode_step"]
