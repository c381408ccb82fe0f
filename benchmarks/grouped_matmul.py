"""Grouped matmul speed: the Pallas kernel vs jax.lax.ragged_dot vs the same FLOPs as a batched einsum,
each as a fraction of the bf16 matmul ceiling measured in the same run (8192^3 jnp.dot).

M1-like MoE shape: 32,768 rows x 2048 -> 3072, 32 groups, bf16; balanced groups and zipf-skewed groups;
forward and forward+backward (3x the FLOPs). Prints a markdown table. Every row is guarded: a failing
implementation prints its traceback and the run goes on.

Rows run most valuable first and the rows left after --budget-s (default 50 s) are skipped, so the table
prints within about a minute; each row is also printed as soon as it is measured.

    python benchmarks/grouped_matmul.py                      # GPU: M1 shape; CPU: tiny shapes, interpreted
    python benchmarks/grouped_matmul.py --tiles 128,64,256,8,3 128,64,128,4,4 --budget-s 100   # a sweep:
                                                             #   block_m,block_k,block_n[,num_warps,num_stages]
"""

import argparse
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels.grouped_matmul import Tiling, grouped_matmul, pallas_gpu, pallas_tpu  # noqa: E402
from timing import median_seconds, rel_err  # noqa: E402

FULL = dict(m=32768, k=2048, n=3072, groups=32, ceiling=8192)
TINY = dict(m=512, k=128, n=256, groups=8, ceiling=256)
DEFAULT_SWEEP = {  # the kernel default first, then alternatives worth one look on Hopper
    "gpu": [pallas_gpu.DEFAULT_TILING, Tiling(128, 64, 128, 4, 4), Tiling(128, 128, 128, 8, 3)],
    "tpu": [pallas_tpu.DEFAULT_TILING, Tiling(256, 256, 256), Tiling(512, 256, 512)],
    "cpu": [Tiling(64, 64, 64)],
}
ZIPF_EXPONENT = 1.2


def group_sizes(m: int, groups: int, skewed: bool, seed: int = 0) -> np.ndarray:
    """Balanced: m // groups each. Skewed: zipf(1.2) shares in a shuffled expert order, summing to m."""
    if not skewed:
        return np.full(groups, m // groups, np.int32)
    shares = 1.0 / np.arange(1, groups + 1) ** ZIPF_EXPONENT
    sizes = np.floor(m * shares / shares.sum()).astype(np.int32)
    sizes[0] += m - sizes.sum()
    return np.random.default_rng(seed).permutation(sizes)


def with_backward(fn):
    """(lhs, rhs, sizes, dout) -> (out, (dlhs, drhs)): the forward is returned so it cannot be dropped."""

    def run(lhs, rhs, sizes, dout):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return out, vjp(dout)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", nargs="+", help="tilings to time: block_m,block_k,block_n[,num_warps,num_stages]")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (default on CPU)")
    parser.add_argument("--budget-s", type=float, default=50.0, help="skip the rows left after this many seconds")
    args = parser.parse_args()

    began = time.perf_counter()
    platform = jax.default_backend()
    shape = TINY if args.tiny or platform == "cpu" else FULL
    m, k, n, groups, side = (shape[key] for key in ("m", "k", "n", "groups", "ceiling"))
    impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "pallas_gpu")
    tilings = [Tiling(*map(int, t.split(","))) for t in args.tiles] if args.tiles else DEFAULT_SWEEP.get(platform)
    print(f"# grouped matmul: {jax.devices()[0].device_kind}, jax {jax.__version__}, {impl}"
          f"{' (interpreted)' if platform == 'cpu' else ''}")
    print(f"m={m} k={k} n={n} groups={groups} bf16; skewed = zipf({ZIPF_EXPONENT}) group sizes\n")

    keys = jax.random.split(jax.random.key(0), 5)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(keys[1], (groups, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    dout = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    sizes = {name: jnp.asarray(group_sizes(m, groups, name == "skewed")) for name in ("balanced", "skewed")}
    flops = 2 * m * k * n
    rows = []  # (groups, implementation, status, seconds, TFLOP/s, max rel err)
    refs = {}  # per case: [ragged_dot output, ragged_dot (output, gradients)]

    def row(case, name, fn, inputs, work, check=None):
        if time.perf_counter() - began > args.budget_s:
            rows.append((case, name, "skipped (time budget)", None, None, None))
            return None
        try:
            jitted = jax.jit(fn)
            seconds = median_seconds(jitted, *inputs)
            out = jitted(*inputs)
            err = rel_err(out, check) if check is not None else None
            rows.append((case, name, "ok", seconds, work / seconds / 1e12, err))
            print(f"  {case} / {name}: {seconds * 1e3:.3f} ms, {work / seconds / 1e12:.1f} TFLOP/s"
                  + ("" if err is None else f", max rel err {err:.1e}"), flush=True)  # survives a timeout kill
            return out
        except Exception:  # one failing implementation must not stop the others
            print(f"--- {case} / {name} failed:", file=sys.stderr)
            traceback.print_exc()
            rows.append((case, name, "FAILED", None, None, None))
            return None

    a, b = (jax.random.normal(key, (side, side), jnp.bfloat16) for key in keys[3:])
    row("ceiling", f"jnp.dot {side}^3", jnp.dot, (a, b), 2 * side**3)
    ceiling = rows[-1][4] or float("nan")
    del a, b

    einsum = lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w)
    batched = (lhs.reshape(groups, m // groups, k), rhs)
    dense = row("balanced", f"batched einsum {groups}x{m // groups} rows", einsum, batched, flops)
    for case, gs in sizes.items():
        if case == "skewed":
            print(f"skewed group sizes: max {int(gs.max())}, min {int(gs.min())}, "
                  f"{int((gs % 128 != 0).sum())} of {groups} not multiples of 128")
        out = row(case, "jax.lax.ragged_dot", jax.lax.ragged_dot, (lhs, rhs, gs), flops)
        refs[case] = [dense.reshape(m, n) if out is None and dense is not None and case == "balanced" else out]

    def pallas(tiling, backward):
        name = f"{impl} {','.join(map(str, tiling))}"
        kernel = lambda x, w, g: grouped_matmul(x, w, g, impl=impl, tiling=tiling)
        for case, gs in sizes.items():
            if backward:
                row(case, f"{name} fwd+bwd", with_backward(kernel), (lhs, rhs, gs, dout), 3 * flops, refs[case][1])
            else:
                row(case, name, kernel, (lhs, rhs, gs), flops, check=refs[case][0])

    pallas(tilings[0], backward=False)
    for case, gs in sizes.items():
        grads = row(case, "jax.lax.ragged_dot fwd+bwd", with_backward(jax.lax.ragged_dot),
                    (lhs, rhs, gs, dout), 3 * flops)
        refs[case].append(grads)
    pallas(tilings[0], backward=True)
    row("balanced", "batched einsum fwd+bwd", with_backward(lambda x, w, _: einsum(x, w)),
        (*batched, None, dout.reshape(groups, m // groups, n)), 3 * flops)
    if platform == "gpu":
        for case, gs in sizes.items():
            row(case, "jax ragged_dot_mgpu 128,64,128 (Mosaic GPU)", mosaic_gpu_ragged_dot, (lhs, rhs, gs), flops,
                check=refs[case][0])
    for tiling in tilings[1:]:
        pallas(tiling, backward=False)
        pallas(tiling, backward=True)

    rows.sort(key=lambda r: ["ceiling", "balanced", "skewed"].index(r[0]))  # stable: measuring order per case
    print("\n| groups | implementation | status | ms | TFLOP/s | of ceiling | max rel err |")
    print("|---|---|---|---|---|---|---|")
    for case, name, status, seconds, tflops, err in rows:
        cells = [case, name, status]
        cells += ["", "", ""] if seconds is None else [f"{seconds * 1e3:.3f}", f"{tflops:.1f}",
                                                       f"{100 * tflops / ceiling:.0f}%"]
        cells.append("" if err is None else f"{err:.1e}")
        print("| " + " | ".join(cells) + " |")
    print(f"\nfwd+bwd rows count 3x the forward FLOPs; errors are against jax.lax.ragged_dot "
          f"(outputs, then gradients). Total {time.perf_counter() - began:.0f} s.")


def mosaic_gpu_ragged_dot(lhs, rhs, sizes):
    """jax's own Hopper grouped matmul (jax.experimental.pallas.ops.gpu), for comparison."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes, block_m=128, block_n=128, block_k=64,
                                      max_concurrent_steps=4, grid_block_n=1)


if __name__ == "__main__":
    main()
