"""Where a decode step's time goes: the MoE layer and the LM head at decode sizes, each timed as it runs inside
the decode `lax.while_loop` (N dependent calls in one jitted `fori_loop`, so launch gaps count and nothing is
hoisted out of the loop), against the bytes each must read at the copy ceiling measured in the same run.

Shapes: the m1-1.5b preset (hidden 2048, 8 experts top-2, width 3072, vocab 32000), bf16, 1 / 2 / 8 tokens.
MoE rows: the ragged dispatch (sort + tile schedule + grouped matmul), the gather dispatch (expert_matmul; a few
panel widths) and the dense reference; "floor" is reading the distinct selected experts' weights once. Head rows:
model.head's fp32_matmul (three exact bf16 parts, one pass over the bf16 weights), fp32 operands at HIGHEST and at
the default precision (whether XLA materialises an fp32 copy of the weights every step), and one bf16 pass.
Every row is guarded.

    python benchmarks/decode_parts.py            # GPU; on CPU a smoke run at small sizes
"""

import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m1jax.layers.common import fp32_matmul  # noqa: E402
from m1jax.layers.moe import DISPATCH, route  # noqa: E402
from pallas_kernels.expert_matmul import expert_matmul  # noqa: E402
from timing import median_seconds  # noqa: E402

GPU = dict(hidden=2048, experts=8, top_k=2, width=3072, vocab=32000, calls=200)
CPU = dict(hidden=256, experts=8, top_k=2, width=384, vocab=4000, calls=20)


def per_call_seconds(layer, x, *operands, calls: int) -> float:
    """Seconds per call of layer(x, *operands) -> y [like x], chained `calls` times inside one jitted loop."""
    def chained(x, *operands):
        step = lambda _, x: x + (1e-3 * layer(x, *operands)).astype(x.dtype)
        return jax.lax.fori_loop(0, calls, step, x)
    return median_seconds(jax.jit(chained), x, *operands) / calls


def copy_ceiling_bytes_s(platform: str) -> float:
    n = (1 << 30) if platform == "gpu" else (1 << 24)
    a = jnp.ones(n // 4, jnp.float32)
    return 2 * n / median_seconds(jax.jit(lambda a: a * 1.0001), a)


def main() -> None:
    platform = jax.default_backend()
    s = GPU if platform == "gpu" else CPU
    d, e, k, w_, v, calls = s["hidden"], s["experts"], s["top_k"], s["width"], s["vocab"], s["calls"]
    keys = jax.random.split(jax.random.key(0), 6)
    bf16 = jnp.bfloat16
    router = jax.random.normal(keys[0], (d, e), jnp.float32) / np.sqrt(d)
    w1 = (jax.random.normal(keys[1], (e, d, w_)) / np.sqrt(d)).astype(bf16)
    w3 = (jax.random.normal(keys[2], (e, d, w_)) / np.sqrt(d)).astype(bf16)
    w2 = (jax.random.normal(keys[3], (e, w_, d)) / np.sqrt(w_)).astype(bf16)
    head = (jax.random.normal(keys[4], (d, v)) / np.sqrt(d)).astype(bf16)
    ceiling = copy_ceiling_bytes_s(platform)
    print(f"# decode parts: {jax.devices()[0].device_kind}, jax {jax.__version__}; copy ceiling "
          f"{ceiling / 1e12:.2f} TB/s; {calls} chained calls per timing\n")
    print("| part | tokens | variant | us per call | floor us | of floor |")
    print("|---|---|---|---|---|---|", flush=True)

    def report(part, tokens, variant, fn, floor_bytes):
        try:
            t = fn()
            floor = floor_bytes / ceiling
            print(f"| {part} | {tokens} | {variant} | {t * 1e6:.1f} | {floor * 1e6:.1f} | {100 * floor / t:.0f}% |",
                  flush=True)
        except Exception:  # noqa: BLE001 - one failing variant must not stop the rest
            traceback.print_exc()
            print(f"| {part} | {tokens} | {variant} | failed | | |", flush=True)

    for tokens in (1, 2, 8):
        x = jax.random.normal(keys[5], (tokens, d), bf16)
        _, _, _, chosen = route(x, router, k)
        distinct = len(np.unique(np.asarray(chosen)))
        floor_bytes = distinct * 3 * d * w_ * 2

        def moe(experts_fn):
            def layer(x, router, w1, w3, w2):
                _, _, weights, ids = route(x, router, k)
                return experts_fn(x, w1, w3, w2, weights, ids, jax.nn.silu)
            return lambda: per_call_seconds(layer, x, router, w1, w3, w2, calls=calls)

        variants = [("ragged", DISPATCH["ragged"]), ("gather", DISPATCH["gather"])]
        if platform == "gpu":
            for block_n in (16, 32, 64):
                def gather_n(x, w1, w3, w2, weights, ids, act, block_n=block_n):
                    mm = lambda a, w, i, **kw: expert_matmul(a, w, i, blocks=(256, block_n), **kw)
                    h = act(mm(x, w1, ids)) * mm(x, w3, ids)
                    y = mm(h.reshape(-1, h.shape[-1]), w2, ids.reshape(-1, 1), out_dtype=jnp.float32)
                    return jnp.einsum("tkd,tk->td", y.reshape(*ids.shape, -1), weights).astype(x.dtype)
                variants.append((f"gather, block_n {block_n}", gather_n))
        variants.append(("dense (every expert)", DISPATCH["dense"]))
        for name, fn in variants:
            report("MoE layer", tokens, name, moe(fn), floor_bytes)

    for tokens in (1, 8):
        y = jax.random.normal(keys[5], (tokens, d), bf16)
        fold = lambda logits: logits[:, :d].astype(bf16)  # feed a slice back so calls depend on each other
        f32 = lambda a: a.astype(jnp.float32)
        variants = (
            ("fp32_matmul: 3 exact bf16 parts (model.head)", lambda y, w: fold(fp32_matmul(y, w))),
            ("fp32 operands, HIGHEST", lambda y, w: fold(jnp.matmul(f32(y), f32(w), precision="highest"))),
            ("fp32 operands, default precision", lambda y, w: fold(f32(y) @ f32(w))),
            ("one bf16 pass (not fp32-accurate)", lambda y, w: fold(jnp.dot(y, w, preferred_element_type=jnp.float32))))
        for name, fn in variants:
            report("LM head", tokens, name, lambda fn=fn: per_call_seconds(fn, y, head, calls=calls), d * v * 2)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
