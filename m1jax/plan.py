"""`m1jax plan`: per-device memory of a config on a mesh, from abstract shapes and the sharding rules.

Nothing is allocated and no devices are needed: the mesh may be larger than this machine. Counted per device:
the parameters as sharded by m1jax.sharding, and for training one gradient copy in the parameter dtype,
AdamW's m and v in fp32, and an fp32 master copy of every parameter not already fp32, all sharded like
the parameters (ZeRO-style); with `--tokens`, an inference cache (m1jax.cache, sharded like the activations).
Activations and XLA temporaries are not counted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Mapping, NamedTuple

from m1jax.cache import cache_bytes
from m1jax.config import ConfigError, ModelConfig, get_preset
from m1jax.sharding import (AXES, ShardingError, format_bytes, format_mesh, is_expert_weight, mesh_shape,
                            param_table, parse_mesh, split_count)

DEVICE_MEMORY = {"H100": 80e9, "H200": 141e9}  # bytes of GPU memory, as sold


class MemoryPlan(NamedTuple):
    mesh: dict[str, int]
    experts_total: int  # bytes of all routed-expert weights (w1, w2, w3)
    other_total: int
    experts: int  # per device, bytes
    other: int
    gradients: int
    adam: int  # m and v, fp32
    master: int  # fp32 copies of non-fp32 parameters

    @property
    def parameters(self) -> int:
        return self.experts + self.other

    @property
    def training(self) -> int:
        return self.parameters + self.gradients + self.adam + self.master


def memory_plan(config: ModelConfig, mesh_sizes: Mapping[str, int]) -> MemoryPlan:
    """Per-device bytes of `config` on a mesh of these axis sizes (ShardingError if it cannot be split)."""
    sizes = {a: mesh_sizes.get(a, 1) for a in AXES}
    totals = dict.fromkeys(("experts_total", "other_total", "experts", "other", "gradients", "adam", "master"), 0)
    for p in param_table(config, sizes):
        local = math.prod(p.local_shape)
        kind = "experts" if is_expert_weight(p) else "other"
        totals[f"{kind}_total"] += math.prod(p.shape) * p.dtype.itemsize
        totals[kind] += local * p.dtype.itemsize
        totals["gradients"] += local * p.dtype.itemsize
        totals["adam"] += 2 * 4 * local
        totals["master"] += 4 * local if p.dtype.name != "float32" else 0
    return MemoryPlan(sizes, **totals)


def fits(nbytes: float) -> str:
    ok = [name for name, cap in DEVICE_MEMORY.items() if nbytes <= cap]
    too_small = [f"{name} ({format_bytes(cap)})" for name, cap in DEVICE_MEMORY.items() if nbytes > cap]
    if not too_small:
        return f"fits on {', '.join(ok)}"
    return f"does NOT fit on {', '.join(too_small)}" + (f"; fits on {', '.join(ok)}" if ok else "")


def format_plan(name: str, config: ModelConfig, plan: MemoryPlan,
                cache: tuple[int, int, int, int] | None = None) -> str:
    """The table; `cache`: (sequences, rows, tokens, bytes per device) of an inference cache to count as well."""
    ep = split_count("experts", plan.mesh)
    devices = math.prod(plan.mesh.values())
    rows = [
        ("parameters", plan.parameters),
        (f"  routed experts ({config.num_experts // ep} of {config.num_experts} per device; "
         f"{format_bytes(plan.experts_total)} in all)", plan.experts),
        (f"  everything else ({format_bytes(plan.other_total)} in all)", plan.other),
        (f"gradients ({config.dtype})", plan.gradients),
        ("AdamW m + v (fp32)", plan.adam),
        ("fp32 master copy of non-fp32 parameters", plan.master),
        ("training total", plan.training),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"m1jax plan: {name} ({config.dtype} parameters, router float32) on mesh {format_mesh(plan.mesh)} "
             f"= {devices} devices", "",
             f"| {'per device':<{width}} | {'bytes':>10} |", f"|{'-' * (width + 2)}|{'-' * 12}|"]
    lines += [f"| {label:<{width}} | {format_bytes(n):>10} |" for label, n in rows]
    lines += [""]
    if cache is None:
        lines.append(f"inference (parameters only): {format_bytes(plan.parameters)} per device: "
                     f"{fits(plan.parameters)}")
    else:
        batch, rows, tokens, nbytes = cache
        padded = f", padded to {rows} rows (whole rows per device)" if rows != batch else ""
        lines.append(f"inference cache for {batch} x {tokens:,} tokens{padded}: {format_bytes(nbytes)} per device "
                     f"(fp32 lightning states and bf16 KV, sharded like the activations)")
        lines.append(f"inference (parameters + cache): {format_bytes(plan.parameters + nbytes)} per device: "
                     f"{fits(plan.parameters + nbytes)}")
    lines += [
              f"training (AdamW, without activations): {format_bytes(plan.training)} per device: "
              f"{fits(plan.training)}"]
    return "\n".join(lines)


def load_config(spec: str, dtype: str | None) -> ModelConfig:
    """A preset name or a Hugging Face config.json (or its directory)."""
    config = ModelConfig.from_hf(spec) if Path(spec).exists() else get_preset(spec)
    return config.replace(dtype=dtype) if dtype else config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m1jax plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="preset name (e.g. minimax-m1-80k) or path to config.json")
    parser.add_argument("--mesh", default="", help="axis sizes, e.g. expert=8 or fsdp=8,expert=8 (one may be -1)")
    parser.add_argument("--devices", type=int, help="total devices (default: the product of --mesh)")
    parser.add_argument("--dtype", help="override the parameter dtype (e.g. bfloat16, float32)")
    parser.add_argument("--tokens", type=int, help="also count an inference cache of this many tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences in that cache (default 1)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.dtype)
        sizes = parse_mesh(args.mesh)
        devices = args.devices or math.prod(s for s in sizes.values() if s > 0)
        sizes = mesh_shape(**sizes, devices=devices)
        cache = None
        if args.tokens is not None:
            if args.tokens < 1 or args.batch < 1:
                raise ShardingError(f"--tokens and --batch must be positive, got {args.tokens} and {args.batch}")
            split = split_count("batch", sizes)  # generation pads the batch to whole rows per device
            rows = -(-args.batch // split) * split
            cache = (args.batch, rows, args.tokens, cache_bytes(config, rows, args.tokens, sizes))
        print(format_plan(args.config, config, memory_plan(config, sizes), cache))
    except (ConfigError, ShardingError) as e:
        print(f"m1jax plan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
