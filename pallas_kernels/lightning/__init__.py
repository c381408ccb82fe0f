"""Lightning attention (MiniMax causal linear attention with per-head decay): reference, XLA and Pallas kernels."""

from pallas_kernels.lightning.api import lightning_attention, lightning_decode_step

__all__ = ["lightning_attention", "lightning_decode_step"]
