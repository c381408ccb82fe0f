"""Training metrics: the FLOP count behind MFU, and a logger writing JSON lines, TensorBoard and a progress bar.

FLOPs per trained token (2 per multiply-add; forward + backward = 3x forward; rematerialisation not counted):
    6 * (active parameters + d * vocab)             every matmul weight a token touches: attention and norms,
                                                    its top-k experts, the router and the LM head (not the
                                                    embedding lookup)
  + 6 * H * D * seq_len       per softmax layer     QK^T and PV over the causal half of the context
  + 6 * H * D * block + 12 * H * D^2  per lightning layer   intra-block QK^T/PV (causal half of a block), plus
                                                    q @ state and the state update k^T v (D x D per head)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax

from m1jax.config import ModelConfig
from m1jax.model import parameter_counts

# Dense bf16 peak FLOP/s per chip, by jax device_kind prefix (vendor datasheets).
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token at sequence length `seq_len` (see the module docstring)."""
    hd = config.num_heads * config.head_dim
    dense = 6 * (parameter_counts(config)["active"] + config.hidden_size * config.vocab_size)
    softmax_layers = sum(t == "softmax" for t in config.layer_types)
    lightning_layers = config.num_layers - softmax_layers
    block = min(config.block_size, seq_len)
    attention = softmax_layers * 6 * hd * seq_len + lightning_layers * (6 * hd * block + 12 * hd * config.head_dim)
    return float(dense + attention)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The datasheet bf16 peak of a known accelerator; None elsewhere (MFU is then not reported)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return flops
    return None


class MetricsLogger:
    """Per-step scalars to `metrics.jsonl` (appended, so a resumed run continues the file), TensorBoard (when
    tensorboardX is installed) and a tqdm bar. Only the main process writes."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, *, tensorboard: bool = True,
                 progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("m1jax train: tensorboardX is not installed; writing metrics.jsonl only", file=sys.stderr)
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu")
                     if k in metrics}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled and self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line for the user that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def _json_number(v: float):
    """JSON has no NaN/inf: write them as strings."""
    v = float(v)
    return v if math.isfinite(v) else str(v)
