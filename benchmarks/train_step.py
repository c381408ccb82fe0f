"""Train-step throughput and MFU, measured against the matmul ceiling of the same device in the same run.

    python3 benchmarks/train_step.py           # GPU/TPU: m1-1.5b, bf16, remat "dots", seq 4096 x 4; CPU: m1-small
    python3 benchmarks/train_step.py --seq 4096 2048 --remat none   # more rows (each compiles, ~30 s on an H200)

MFU = model FLOPs / (step time * peak). The model FLOPs are train.metrics.train_flops_per_token * tokens:
6 * (active params + d * vocab) + 6 * H * D * seq per softmax layer + (6 * H * D * block + 12 * H * D^2) per
lightning layer (causal halves; remat recompute not counted). Two peaks are reported: the datasheet bf16 peak
(when the device is known) and the ceiling measured here, jnp.dot of two 8192 x 8192 bf16 matrices (fp32 on
CPU). Prints a markdown table; a failing configuration prints its traceback and the rest still runs.
"""

from __future__ import annotations

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import get_preset
from m1jax.sharding import make_mesh
from train.config import TrainConfig
from train.metrics import peak_flops_per_device, train_flops_per_token
from train.step import make_trainer


def matmul_ceiling(dtype, n: int = 8192, reps: int = 10) -> float:
    """Achieved FLOP/s of one n x n x n matmul, best of `reps`."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def bench_step(preset: str, seq: int, batch: int, compute_dtype: str, remat: str, steps: int,
               lightning_impl: str) -> dict:
    tcfg = TrainConfig.from_dict({
        "model": {"preset": preset, "overrides": {"lightning_impl": lightning_impl}},
        "data": {"seq_len": seq, "batch_size": batch},
        "run": {"steps": 1000, "compute_dtype": compute_dtype, "remat": remat},
    })
    config = tcfg.model_config()
    trainer = make_trainer(config, tcfg, make_mesh(devices=jax.devices()[:1]))
    state = trainer.init(trainer.random_params())
    rng = np.random.default_rng(0)
    ids = jax.device_put(rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int32), trainer.batch_sharding)
    seg = jax.device_put(np.ones((batch, seq), np.int32), trainer.batch_sharding)
    mask = jax.device_put(np.ones((batch, seq), bool), trainer.batch_sharding)
    t = time.perf_counter()
    state, m = trainer.step(state, ids, seg, mask)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    state, m = trainer.step(state, ids, seg, mask)  # one more warm-up step
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = trainer.step(state, ids, seg, mask)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t) / steps
    flops = train_flops_per_token(config, seq) * batch * seq
    return {"config": f"{preset} seq {seq} x batch {batch}, {compute_dtype}, remat {remat}, lightning "
                      f"{lightning_impl}", "step_s": step_s, "compile_s": compile_s,
            "tokens_per_s": batch * seq / step_s, "tflops": flops / step_s / 1e12, "loss": float(m["loss"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accel = jax.default_backend() != "cpu"
    parser.add_argument("--preset", default="m1-1.5b" if accel else "m1-small")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096] if accel else [256])
    parser.add_argument("--batch", type=int, default=4 if accel else 8)
    parser.add_argument("--dtype", default="bfloat16" if accel else "float32")
    parser.add_argument("--remat", default="dots" if accel else "none", choices=("none", "full", "dots"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lightning-impl", default="auto")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    ceiling = matmul_ceiling(jnp.bfloat16 if accel else jnp.float32, 8192 if accel else 2048)
    peak = peak_flops_per_device(device)
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"matmul ceiling (jnp.dot {'8192^3 bf16' if accel else '2048^3 fp32'}): {ceiling / 1e12:.3g} TFLOP/s"
          + (f"; datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print(f"model FLOPs/token ({args.preset}): "
          + ", ".join(f"seq {s}: {train_flops_per_token(get_preset(args.preset), s) / 1e9:.3g} GFLOP"
                      for s in args.seq))
    print()
    print("| config | step (s) | compile (s) | tokens/s | model TFLOP/s | MFU vs ceiling | MFU vs peak |")
    print("|---|---|---|---|---|---|---|")
    for seq in args.seq:
        batch = max(1, args.batch * args.seq[0] // seq)  # same tokens per step at every length
        # one shape failing (e.g. out of memory) must not hide the others; a failing kernel retries on XLA
        for impl in dict.fromkeys([args.lightning_impl, "xla"]):
            try:
                r = bench_step(args.preset, seq, batch, args.dtype, args.remat, args.steps, impl)
                break
            except Exception:
                print(f"| {args.preset} seq {seq} x batch {batch}, lightning {impl} | failed | | | | | |")
                traceback.print_exc()
        else:
            continue
        vs_peak = f"{r['tflops'] * 1e12 / peak:.1%}" if peak else "n/a"
        print(f"| {r['config']} | {r['step_s']:.3f} | {r['compile_s']:.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops']:.3g} | {r['tflops'] * 1e12 / ceiling:.1%} | {vs_peak} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
