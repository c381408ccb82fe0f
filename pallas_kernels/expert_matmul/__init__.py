"""Selected-expert matmul (each token times the weights of its own top-k experts): reference and Pallas kernels."""

from pallas_kernels.expert_matmul.api import expert_matmul

__all__ = ["expert_matmul"]
