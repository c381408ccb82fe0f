"""The softmax layers' attention core at long sequences: one einsum over all scores (`dense_attention`, what calls
under 8 GiB of scores use), the blockwise online softmax (`blockwise_attention`, above it) at two block sizes, and
cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`, causal, no packing or padding
masks) as the anchor, in the same run.

Shapes: M1's softmax layer (64 query heads, 8 KV heads, head_dim 128), bf16, batch 1. Rows: a causal training
sequence of T tokens (forward, and forward+backward of sum(out * w)), and a 2048-token prefill chunk at the end of
a cache of S slots (forward). Each row prints ms, TFLOP/s of the causal work, and the largest relative error
against the first row of its setting (dense where its scores fit, else blockwise 512). Every row is guarded.

    python benchmarks/softmax_attention.py       # GPU; on CPU a smoke run at small sizes
"""

import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m1jax.layers.attention import dense_attention  # noqa: E402
from m1jax.layers.blockwise_attention import KeyMask, blockwise_attention  # noqa: E402
from timing import median_seconds, rel_err  # noqa: E402

GPU = dict(heads=64, kv_heads=8, head_dim=128, train=(4096, 8192, 32768), chunk=2048, caches=(32768, 131072),
           blocks=(512, 1024), dense_limit=2**35)
CPU = dict(heads=4, kv_heads=2, head_dim=32, train=(256,), chunk=64, caches=(512,), blocks=(64,), dense_limit=2**28)


def inputs(n, slots, s, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    g = s["heads"] // s["kv_heads"]
    q = jax.random.normal(keys[0], (1, n, s["kv_heads"], g, s["head_dim"]), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, slots, s["kv_heads"], s["head_dim"]), jnp.bfloat16) for kk in keys[1:3])
    w = jax.random.normal(keys[3], q.shape, jnp.float32)
    mask = KeyMask(jnp.ones((1, slots), bool), slots - n + jnp.arange(n))
    return q, k, v, w, mask


def implementations(s, mask):
    scale = s["head_dim"] ** -0.5
    impls = {"dense": lambda q, k, v: dense_attention(q, k, v, mask, scale=scale).astype(jnp.float32)}
    for block in s["blocks"]:
        impls[f"blockwise {block}"] = (lambda b: lambda q, k, v: blockwise_attention(q, k, v, mask, block=b,
                                                                                    scale=scale))(block)
    if jax.default_backend() == "gpu":
        def cudnn(q, k, v):
            b, n, kv, g, d = q.shape
            out = jax.nn.dot_product_attention(q.reshape(b, n, kv * g, d), k, v, scale=scale, is_causal=True,
                                               implementation="cudnn")
            return out.reshape(q.shape).astype(jnp.float32)
        impls["cudnn (anchor)"] = cudnn
    return impls


def row(label, fn, args, flops, reference):
    try:
        ms = median_seconds(fn, *args) * 1e3
        out = fn(*args)
        err = "" if reference is None else f"{rel_err(out, reference):.1e}"
        print(f"| {label} | {ms:.3f} | {flops / ms / 1e9:.1f} | {err} |", flush=True)
        return out
    except Exception as e:  # noqa: BLE001 (one failed row must not stop the others)
        print(f"| {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | |", flush=True)
        traceback.print_exc(file=sys.stderr)
        return None


def main() -> None:
    s = GPU if jax.default_backend() == "gpu" else CPU
    d, h = s["head_dim"], s["heads"]
    print(f"# softmax attention core: {jax.devices()[0].device_kind}, jax {jax.__version__}, {h} heads, "
          f"{s['kv_heads']} KV heads, head_dim {d}, bf16, batch 1")
    print("\n| setting / implementation | ms | TFLOP/s (causal) | max rel err vs reference |\n|---|---|---|---|")
    for n in s["train"]:
        q, k, v, w, mask = inputs(n, n, s)
        fwd_flops = 2 * 2 * h * d * n * n / 2  # QK^T and PV over the causal half
        reference = grad_reference = None
        for name, impl in implementations(s, mask).items():
            if name == "dense" and h * n * n * 4 > s["dense_limit"]:
                continue
            out = row(f"T = {n}, forward, {name}", jax.jit(impl), (q, k, v), fwd_flops, reference)
            reference = out if reference is None else reference
            grad = jax.jit(jax.grad(lambda q, k, v, f=impl: jnp.sum(f(q, k, v) * w), (0, 1, 2)))
            g = row(f"T = {n}, forward+backward, {name}", grad, (q, k, v), 3.5 * fwd_flops, grad_reference)
            grad_reference = g if grad_reference is None else grad_reference
    for slots in s["caches"]:
        n = s["chunk"]
        q, k, v, _, mask = inputs(n, slots, s)
        flops = 2 * 2 * h * d * n * slots
        reference = None
        for name, impl in implementations(s, mask).items():
            if name.startswith("cudnn"):
                continue  # its causal mask is aligned to the first key, not to the chunk's slots
            if name == "dense" and h * n * slots * 4 > s["dense_limit"]:
                continue
            out = row(f"chunk {n} at the end of {slots} slots, forward, {name}", jax.jit(impl), (q, k, v), flops,
                      reference)
            reference = out if reference is None else reference


if __name__ == "__main__":
    main()
