"""Grouped matmul (MoE experts over rows sorted by expert): reference, Pallas GPU and Pallas TPU kernels."""

from pallas_kernels.grouped_matmul.api import grouped_matmul
from pallas_kernels.grouped_matmul.tiling import Tiling

__all__ = ["Tiling", "grouped_matmul"]
