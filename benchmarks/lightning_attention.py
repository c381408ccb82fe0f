"""Lightning attention on one GPU: Pallas (Triton) kernels vs the XLA chunked scan vs fla, measured in one run.

    python benchmarks/lightning_attention.py            # GPU: B=1, H=64, D=128, bf16, T in {8K, 32K}
    python benchmarks/lightning_attention.py --long     # also T=128K
    python benchmarks/lightning_attention.py --sweep    # also Pallas tile/chunk/warp variants at the largest T
    python benchmarks/lightning_attention.py            # CPU: a tiny shape in interpret mode (a smoke test)

Prints a markdown table: forward and forward+backward milliseconds, effective TB/s (minimal bytes: q, k, v read
and o written forward; plus do read and dq, dk, dv written backward) against a 2 GiB copy measured in the same run,
and the ratio to fla's ``chunk_simple_gla`` (timed as in shared/bench/anchor_torch.py). Also a decode step at batch
64 against its memory floor, and a GPU correctness check (bf16 kernels vs the fp32 XLA path). Every measurement is
wrapped so that one failing implementation prints its traceback and the rest still runs.
"""

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import lightning_attention, lightning_decode_step  # noqa: E402
from pallas_kernels.lightning import pallas_gpu  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16
ROWS: list[dict] = []


def minimax_slopes(heads: int, layer: int = 0, num_layers: int = 80) -> np.ndarray:
    return (2.0 ** (-8 * (np.arange(heads) + 1) / heads) * (1 - layer / (num_layers - 1) + 1e-5)).astype(np.float32)


def attempt(what: str, fn):
    """Run one measurement; on failure print the traceback and go on."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a benchmark must survive any one implementation failing
        print(f"\n### {what} FAILED\n", flush=True)
        traceback.print_exc()
        return None


def time_jax(fn, *args, reps: int = 10, inner: int = 5) -> float:
    """Median ms per call: ``inner`` back-to-back calls per sample (amortises the host sync), after warm-up."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return float(np.median(samples))


def time_torch(fn, warmup: int = 3, iters: int = 10) -> float:
    """CUDA-event median, exactly as shared/bench/anchor_torch.py."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def copy_ceiling_tb_s() -> float:
    """Read+write bandwidth of a 2 GiB device copy."""
    x = jnp.ones((1024 ** 3,), BF16)
    ms = time_jax(jax.jit(lambda a: a + 1), x)
    return 2 * x.nbytes / ms / 1e9


def make_inputs(batch, seq, heads, dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k = (jax.nn.silu(jax.random.normal(kk, (batch, seq, heads, dim), F32)).astype(dtype) for kk in keys[:2])
    v, do = (jax.random.normal(kk, (batch, seq, heads, dim), F32).astype(dtype) for kk in keys[2:])
    return q, k, v, do


@contextlib.contextmanager
def tunables(**values):
    """Temporarily set pallas_gpu's module-level tunables (read when a call is traced)."""
    old = {name: getattr(pallas_gpu, name) for name in values}
    for name, value in values.items():
        setattr(pallas_gpu, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(pallas_gpu, name, value)


SWEEP = [  # (label, chunk_size, tunables)
    ("chunk 128", 128, {}),
    ("4 chunks/block", None, dict(CHUNKS_PER_BLOCK=4)),
    ("16 chunks/block", None, dict(CHUNKS_PER_BLOCK=16)),
    ("BV=BK=128", None, dict(BLOCK_V=128, BLOCK_K=128)),
    ("4 warps", None, dict(NUM_WARPS=4)),
]


def jax_fns(impl, slopes, chunk_size=None):
    def fwd(q, k, v):
        return lightning_attention(q, k, v, slopes, impl=impl, chunk_size=chunk_size)[0]

    def loss(q, k, v, do):
        return jnp.sum(fwd(q, k, v).astype(F32) * do.astype(F32))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_jax(name, impl, seq, args, chunk_size=None, tune=None):
    batch, heads, dim = args.batch, args.heads, args.dim
    q, k, v, do = make_inputs(batch, seq, heads, dim, args.dtype)
    slopes = jnp.asarray(minimax_slopes(heads))
    fwd, fwd_bwd = jax_fns(impl, slopes, chunk_size)
    row = dict(impl=name, T=seq)
    with tunables(**(tune or {})):
        row["fwd_ms"] = attempt(f"{name} T={seq} forward", lambda: time_jax(fwd, q, k, v))
        row["fb_ms"] = attempt(f"{name} T={seq} forward+backward", lambda: time_jax(fwd_bwd, q, k, v, do))
    ROWS.append(row)
    print(f"{name} T={seq}: fwd {row['fwd_ms']} ms, fwd+bwd {row['fb_ms']} ms", flush=True)


def bench_fla(seq, args):
    import torch
    from fla.ops.simple_gla import chunk_simple_gla
    shape = (args.batch, seq, args.heads, args.dim)
    q, k = (torch.nn.functional.silu(torch.randn(shape, device="cuda")).bfloat16() for _ in range(2))
    v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    g_gamma = -torch.tensor(minimax_slopes(args.heads), device="cuda")
    row = dict(impl="fla chunk_simple_gla", T=seq)
    row["fwd_ms"] = time_torch(lambda: chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

    def fb():
        o, _ = chunk_simple_gla(qg, kg, vg, g_gamma=g_gamma, scale=1.0)
        o.backward(do)

    row["fb_ms"] = time_torch(fb)
    ROWS.append(row)
    print(f"fla T={seq}: fwd {row['fwd_ms']} ms, fwd+bwd {row['fb_ms']} ms", flush=True)
    del q, k, v, do, qg, kg, vg
    torch.cuda.empty_cache()


def bench_decode(args, ceiling):
    batch, heads, dim = args.decode_batch, args.heads, args.dim
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(kk, (batch, heads, dim), F32).astype(args.dtype) for kk in keys[:3])
    slopes = jnp.asarray(minimax_slopes(heads))
    floor_ms = 2 * batch * heads * dim * dim * 4 / (ceiling * 1e9) if ceiling else None
    state0 = jax.random.normal(keys[3], (batch, heads, dim, dim), F32)
    got, ref = (lightning_decode_step(q, k, v, slopes, state0, impl=impl) for impl in ("pallas_gpu", "xla"))
    print(f"| decode pallas_gpu vs xla | out {rel(got[0], ref[0]):.1e} | state {rel(got[1], ref[1]):.1e} |", flush=True)
    for impl in ("pallas_gpu", "xla"):
        def run(impl=impl):
            step = jax.jit(lambda q, k, v, s: lightning_decode_step(q, k, v, slopes, s, impl=impl),
                           donate_argnums=3)
            state = jax.random.normal(keys[3], (batch, heads, dim, dim), F32)
            for _ in range(3):
                _, state = step(q, k, v, state)
            jax.block_until_ready(state)
            samples = []
            for _ in range(10):
                t0 = time.perf_counter()
                for _ in range(10):
                    _, state = step(q, k, v, state)
                jax.block_until_ready(state)
                samples.append((time.perf_counter() - t0) / 10 * 1e3)
            return float(np.median(samples))
        ms = attempt(f"decode {impl}", run)
        if ms is not None:
            pct = f"{100 * floor_ms / ms:.0f}% of floor" if floor_ms else ""
            print(f"| decode step {impl}, B={batch}, H={heads}, D={dim}, fp32 state | {ms:.4f} ms | "
                  f"floor {floor_ms and f'{floor_ms:.4f}'} ms | {pct} |", flush=True)


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(x)) else float("nan")


def check_correctness(args, impl, configs):
    """Kernels vs the fp32 XLA path on the same (bf16-rounded) inputs, for (dtype, packed) configs."""
    batch, seq, heads, dim = 2, 2048 + 37, 4, args.dim
    slopes = jnp.asarray(minimax_slopes(64)[[0, 20, 40, 63]])
    keys = jax.random.split(jax.random.key(7), 3)
    h0 = jax.random.normal(keys[0], (batch, heads, dim, dim), F32)
    d_final = jax.random.normal(keys[1], (batch, heads, dim, dim), F32)
    seg = jnp.asarray(np.cumsum(np.random.default_rng(0).random((batch, seq)) < 3e-3, axis=1), jnp.int32)
    for dtype, packed in configs:
        q, k, v, do = make_inputs(batch, seq, heads, dim, dtype, seed=3)

        def loss(q, k, v, h0, impl, prec):
            with jax.default_matmul_precision(prec):
                out, final = lightning_attention(q, k, v, slopes, initial_state=h0,
                                                 segment_ids=seg if packed else None, impl=impl)
            return jnp.sum(out.astype(F32) * do.astype(F32)) + jnp.sum(final * d_final), (out, final)

        def run(impl, cast, prec):
            fn = jax.jit(jax.value_and_grad(lambda *a: loss(*a, impl, prec), argnums=(0, 1, 2, 3), has_aux=True))
            (_, (out, final)), grads = fn(*(cast(x) for x in (q, k, v)), h0)
            return (out, final, *grads)

        got = run(impl, lambda x: x, "default")
        ref = run("xla", lambda x: x.astype(F32), "highest")
        names = ("out", "final_state", "dq", "dk", "dv", "dh0")
        errs = {n: rel(g, r) for n, g, r in zip(names, got, ref)}
        tol = 5e-3 if dtype == BF16 else 1e-4
        ok = all(e <= tol for e in errs.values())
        print(f"| {impl} {jnp.dtype(dtype).name}{' packed' if packed else ''} vs fp32 xla, T={seq} | "
              + " | ".join(f"{n} {e:.1e}" for n, e in errs.items()) + f" | {'PASS' if ok else 'FAIL'} (tol {tol}) |",
              flush=True)


def print_table(args, ceiling):
    fla = {r["T"]: r for r in ROWS if r["impl"].startswith("fla")}
    elem = args.batch * args.heads * args.dim * jnp.dtype(args.dtype).itemsize
    print(f"\n## Lightning attention, B={args.batch}, H={args.heads}, D={args.dim}, {jnp.dtype(args.dtype).name}; "
          f"copy ceiling {ceiling and f'{ceiling:.2f}'} TB/s; {jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    print("| impl | T | fwd ms | fwd TB/s (% ceiling) | fwd vs fla | fwd+bwd ms | fwd+bwd TB/s (% ceiling) "
          "| fwd+bwd vs fla |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        cells = []
        for key, n_tensors in (("fwd_ms", 4), ("fb_ms", 11)):
            ms, ref = r.get(key), fla.get(r["T"], {}).get(key)
            if ms is None:
                cells += ["failed", "", ""]
                continue
            tb_s = n_tensors * elem * r["T"] / ms / 1e9
            pct = f" ({100 * tb_s / ceiling:.0f}%)" if ceiling else ""
            cells += [f"{ms:.3f}", f"{tb_s:.2f}{pct}", f"{ref / ms:.2f}x" if ref else ""]
        print(f"| {r['impl']} | {r['T']} | " + " | ".join(cells) + " |")
    print("\n(vs fla > 1 means faster than fla. TB/s counts only the minimal bytes: 4 tensors forward, "
          "11 forward+backward.)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also T=128K")
    parser.add_argument("--sweep", action="store_true", help="also Pallas variants at the largest T <= 32K")
    parser.add_argument("--seqs", type=str, default=None, help="comma-separated sequence lengths")
    parser.add_argument("--budget", type=float, default=140, help="seconds after which optional parts are skipped")
    args = parser.parse_args()
    args.gpu = jax.default_backend() == "gpu"
    print(f"devices: {jax.devices()}, jax {jax.__version__}", flush=True)
    if args.gpu:
        args.batch, args.heads, args.dim, args.dtype, args.decode_batch = 1, 64, 128, BF16, 64
        seqs = [8192, 32768] + ([131072] if args.long else [])
        impls = [("pallas_gpu", "pallas_gpu", None), ("xla chunk 256", "xla", 256)]  # 256: as the XLA anchor
    else:  # tiny interpret-mode smoke run
        args.batch, args.heads, args.dim, args.dtype, args.decode_batch = 1, 2, 64, F32, 2
        seqs = [256]
        impls = [("pallas_gpu (interpret)", "pallas_gpu", None), ("pallas_tpu (interpret)", "pallas_tpu", None),
                 ("xla", "xla", None)]
    if args.seqs:
        seqs = [int(s) for s in args.seqs.split(",")]
    deadline = time.perf_counter() + args.budget

    def optional(what, fn):  # later parts are skipped once the time budget is spent, so the table still prints
        if time.perf_counter() > deadline:
            print(f"(skipped {what}: over the {args.budget}s budget)", flush=True)
        else:
            attempt(what, fn)

    # Most valuable first: the caller may kill the run at its time limit.
    ceiling = attempt("copy ceiling", copy_ceiling_tb_s) if args.gpu else None
    print("\n## Correctness on this device\n")
    attempt("correctness bf16", lambda: check_correctness(args, "pallas_gpu", [(BF16, False)]))
    runs = [(seq, name, impl, chunk) for seq in seqs for name, impl, chunk in impls
            if not (impl == "xla" and seq > 32768)]  # the autodiff'd scan: slow and tens of GB at 128K
    runs.sort(key=lambda run: run[2] == "xla")  # Pallas and fla before the XLA baseline
    for seq, name, impl, chunk in [r for r in runs if r[2] != "xla"]:
        optional(f"{name} T={seq}", lambda: bench_jax(name, impl, seq, args, chunk))
    if args.gpu:
        for seq in seqs:
            optional(f"fla T={seq}", lambda: bench_fla(seq, args))
    for seq, name, impl, chunk in [r for r in runs if r[2] == "xla"]:
        optional(f"{name} T={seq}", lambda: bench_jax(name, impl, seq, args, chunk))
    print("\n## Decode step\n")
    optional("decode", lambda: bench_decode(args, ceiling))
    print("\n## More correctness\n")
    optional("correctness packed / fp32", lambda: check_correctness(args, "pallas_gpu", [(BF16, True), (F32, True)]))
    if args.sweep:
        seq = max(s for s in seqs if s <= 32768)
        for label, chunk, tune in SWEEP:
            optional(f"sweep {label}", lambda: bench_jax(f"pallas_gpu {label}", "pallas_gpu", seq, args, chunk, tune))
    print_table(args, ceiling)


if __name__ == "__main__":
    main()
