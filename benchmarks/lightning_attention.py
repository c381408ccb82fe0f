"""Lightning attention on one GPU: the Pallas (Triton) kernels vs fla vs the XLA chunked scan, and a tile sweep.

    python benchmarks/lightning_attention.py                # GPU: B=1, H=64, D=128, bf16, T in {8K, 32K}
    python benchmarks/lightning_attention.py --budget 100   # start no new part after about 100 s
    python benchmarks/lightning_attention.py --long --no-sweep
    python benchmarks/lightning_attention.py                # CPU: a tiny shape in interpret mode (a smoke test)

Time limit: with the defaults (--budget 250, --after-fla 50) the run ends within about 280 s of start-up; give
it 290 s (``T_LIGHTNING=290 bash benchmarks/run_gpu.sh lightning``).

Every row is printed (markdown) as soon as it is measured, so a run killed at its time limit keeps what it measured.
fla's ``chunk_simple_gla`` runs in a subprocess started at start-up (timed as in shared/bench/anchor_torch.py):
its first calls, Triton autotuning of about a hundred configs per kernel, overlap everything this process does
until --budget minus --after-fla seconds (200 s by default); it is stopped while anything here is timed, times its
own calls alone once this process waits for it, and is killed if its first calls are not done by then (their
seconds are printed). Order, most valuable first: correctness on the device (bf16 kernels, the three-kernel and the
fused forward, vs the fp32 XLA path); Pallas forward and forward+backward at the default tuning; a decode step at
batch 64 against its memory floor; the XLA anchor at the largest T <= 32K (forward only, one warm-up and 3 calls);
a sweep of forward tunings at that T (``SWEEP``: the default, then the fused forward's candidates, then the
three-kernel ones), each row with its output's error against the default's; then fla; then chunks per block (and
the local-state tile) around the fastest, and forward+backward for the two fastest, with gradient errors against
the default's; then the packed-segment correctness check. The sweep and its follow-ups compile in background
threads while the earlier parts run. TB/s counts minimal bytes (q, k, v read and o written forward; plus do read
and dq, dk, dv written backward) against a 2 GiB copy measured in the same run. Every part is guarded: a failure
prints its traceback and the run goes on; no part starts once --budget seconds have passed since start-up, or if
its estimated cost would not fit.
"""

import os
import time

START = time.perf_counter()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the fla subprocess

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import lightning_attention, lightning_decode_step  # noqa: E402
from pallas_kernels.lightning.api import GPU_CHUNK  # noqa: E402
from pallas_kernels.lightning.pallas_gpu import DEFAULT_TUNING, Tuning, lightning_attention_pallas_gpu  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16

# Forward tunings at T=32K, most promising first (the default first: every other row is compared with it). Each
# compiles for sm_90a without register spills and fits shared memory (tests/kernels/test_lightning_pallas.py).
# What they trade (Triton 3.6, ptxas): at 2 stages the next chunk's loads are issued after this chunk's work (no
# overlap), at 3 one chunk ahead; at chunk 64 with 8 warps both warpgroups compute the same Q K^T (a chained dot
# puts all warps on M=64), 4 warps or chunk 128 do not; BV < head dim recomputes Q K^T once per v-tile; the output
# kernel's registers and shared memory allow 1 program per SM at the default, 2 at 8 warps with BV 32 and at
# 4 warps (3 with BV 16), so that one program's serial chunk chain hides another's latency.
# The fused forward (one kernel, q, k, v read once from HBM if the k, v of pass 1 are still in L2 for pass 2) trades
# the block size: small blocks keep that re-read in L2 but lengthen the serial chain of state hand-offs (one per
# block: T / block of them at 32K, a few microseconds each), large ones the other way round. Its 4-warp BV 64 form
# spills registers. These rows also set the backward's tiles (the same Tuning fields), which only the
# forward+backward rows see.
FUSED = [
    ("fused, BV 64, 8 chunks/block", 64, Tuning(chunks_per_block=8, block_v=64, num_warps=8, fused_forward=True)),
    ("fused, BV 64, 4 chunks/block", 64, Tuning(chunks_per_block=4, block_v=64, num_warps=8, fused_forward=True)),
    ("fused, BV 64, 16 chunks/block", 64, Tuning(chunks_per_block=16, block_v=64, num_warps=8, fused_forward=True)),
    ("fused, BV 128, 8 chunks/block", 64, Tuning(chunks_per_block=8, block_v=128, num_warps=8, fused_forward=True)),
    ("fused, BV 128, 4 chunks/block", 64, Tuning(chunks_per_block=4, block_v=128, num_warps=8, fused_forward=True)),
    ("fused, BV 128, 16 chunks/block", 64, Tuning(chunks_per_block=16, block_v=128, num_warps=8, fused_forward=True)),
    ("fused, 4 warps, BV 32, 8 chunks/block", 64,
     Tuning(chunks_per_block=8, block_v=32, local_block_v=32, block_k=32, num_warps=4, fused_forward=True)),
    ("fused, BV 64, 3 stages, 8 chunks/block", 64,
     Tuning(chunks_per_block=8, block_v=64, num_warps=8, num_stages=3, fused_forward=True)),
    ("fused, chunk 128, BV 64, 4 chunks/block", 128,
     Tuning(chunks_per_block=4, block_v=64, num_warps=8, fused_forward=True)),
]
SWEEP = [  # (label, chunk, tuning)
    ("default", GPU_CHUNK, DEFAULT_TUNING),
    *FUSED,
    ("3 stages", 64, Tuning(num_stages=3)),
    ("4 warps, BV 32, 3 stages", 64, Tuning(num_warps=4, block_v=32, local_block_v=32, block_k=32, num_stages=3)),
    ("BV 128, 3 stages", 64, Tuning(block_v=128, local_block_v=128, num_stages=3)),
    ("4 warps", 64, Tuning(num_warps=4, block_k=32)),
    ("BV 32, 3 stages", 64, Tuning(block_v=32, num_stages=3)),
    ("4 stages", 64, Tuning(num_stages=4)),
    ("4 warps, BV 16, local BV 32", 64, Tuning(num_warps=4, block_v=16, local_block_v=32, block_k=32)),
    ("BV 32", 64, Tuning(block_v=32)),
    ("BV 128", 64, Tuning(block_v=128, local_block_v=128)),
    ("chunk 128", 128, Tuning(chunks_per_block=4)),
]
# With packed segments (segment_ids) the kernels hold more registers: these tunings then spill (the test checks it).
SPILLS_WHEN_PACKED = {"default", "4 warps, BV 32, 3 stages", "BV 128, 3 stages", "4 warps",
                      "4 warps, BV 16, local BV 32", "BV 128", "chunk 128",
                      "fused, BV 128, 8 chunks/block", "fused, BV 128, 4 chunks/block",
                      "fused, BV 128, 16 chunks/block", "fused, 4 warps, BV 32, 8 chunks/block",
                      "fused, chunk 128, BV 64, 4 chunks/block"}
LOCAL_BLOCK_V = {8: (32, 64, 128), 4: (32, 64)}  # local-state tiles without spills, by num_warps
MAX_CHUNKS_PER_BLOCK = 32  # the default's 4-warp dv kernel spills registers at 64 and 128


def refinements(label: str, chunk: int, tuning: Tuning) -> list[tuple[str, int, Tuning]]:
    """Second sweep round around the fastest first-round config: chunks per block and the local-state tile."""
    cpbs = [n for n in (tuning.chunks_per_block * 2, tuning.chunks_per_block * 4, tuning.chunks_per_block // 2)
            if 1 <= n <= MAX_CHUNKS_PER_BLOCK]
    out = [(f"{label}; {n} chunks/block", chunk, dataclasses.replace(tuning, chunks_per_block=n)) for n in cpbs]
    if not tuning.fused_forward:  # the fused forward has no separate local-state tile
        out += [(f"{label}; local BV {bv}", chunk, dataclasses.replace(tuning, local_block_v=bv))
                for bv in LOCAL_BLOCK_V[tuning.num_warps] if bv != tuning.local_block_v]
    return out


def packed_note(label: str) -> str:
    return " (spills registers with packed segments)" if label.split(";")[0] in SPILLS_WHEN_PACKED else ""


def describe(chunk: int, t: Tuning) -> str:
    return (f"{'fused forward, ' if t.fused_forward else ''}chunk {chunk}, {t.chunks_per_block} chunks/block, "
            f"BV {t.block_v}, local BV {t.local_block_v}, BK {t.block_k}, {t.num_warps} warps, "
            f"{t.num_stages} stages")


def minimax_slopes(heads: int, layer: int = 0, num_layers: int = 80) -> np.ndarray:
    return (2.0 ** (-8 * (np.arange(heads) + 1) / heads) * (1 - layer / (num_layers - 1) + 1e-5)).astype(np.float32)


class Budget:
    """Seconds since start-up; a part starts only if its estimated cost still fits."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - START)

    def allows(self, what: str, need: float) -> bool:
        if self.left() < need:
            print(f"\n(skipped {what}: {self.left():.0f} s of the {self.seconds:.0f} s budget left, "
                  f"needs ~{need:.0f} s)", flush=True)
            return False
        return True


def attempt(what: str, fn):
    """Run one part; on failure print the traceback and go on."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a benchmark must survive any one implementation failing
        print(f"\n### {what} FAILED ({time.perf_counter() - START:.0f} s)\n", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        return None


def section(title: str, header: list[str]) -> None:
    print(f"\n## {title}  (t = {time.perf_counter() - START:.0f} s)\n\n| " + " | ".join(header) + " |\n|"
          + "---|" * len(header), flush=True)


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def time_jax(fn, *args, warmup: int = 2, reps: int = 10, inner: int = 5) -> float:
    """Median ms per call: ``inner`` back-to-back calls per sample (amortises the host sync), after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return float(np.median(samples))


def rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(x)) else float("nan")


def rel_device(x, ref) -> float:
    """Relative error computed on the device (for 32K-token tensors)."""
    x, ref = x.astype(F32), ref.astype(F32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


class Job:
    """A function lowered now and compiled in a background thread (XLA releases the GIL while it compiles)."""
    pool = concurrent.futures.ThreadPoolExecutor(4)

    def __init__(self, fn, *args):
        self.lowered = jax.jit(fn).lower(*args)
        self.future = self.pool.submit(self._compile)

    def _compile(self):
        t0 = time.perf_counter()
        return self.lowered.compile(), time.perf_counter() - t0

    def result(self):
        """(compiled function, compile seconds); compiled in this thread if the background compile failed."""
        try:
            return self.future.result()
        except Exception:  # noqa: BLE001 - e.g. a compiler that is not thread-safe: try once more here
            traceback.print_exc()
            print("(background compile failed: compiling in the main thread)", flush=True)
            return self._compile()


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


def attention_fns(slopes, impl="pallas_gpu", chunk=None, tuning=None, interpret=None):
    """(forward, forward+backward) as plain functions of (q, k, v[, do]): the public API, or one Pallas tuning."""
    def fwd(q, k, v):
        if tuning is None:
            return lightning_attention(q, k, v, slopes, impl=impl, chunk_size=chunk)[0]
        return lightning_attention_pallas_gpu(q, k, v, slopes, None, None, chunk_size=chunk, tuning=tuning,
                                              interpret=interpret)[0]

    def fwd_bwd(q, k, v, do):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(F32) * do.astype(F32)), argnums=(0, 1, 2))(q, k, v)

    return fwd, fwd_bwd


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    budget: Budget
    ceiling: float | None = None
    times: dict = dataclasses.field(default_factory=dict)      # (impl, T, pass) -> ms
    inputs: dict = dataclasses.field(default_factory=dict)     # T -> (q, k, v, do)
    default_out: dict = dataclasses.field(default_factory=dict)  # T -> default forward output / gradients

    def tb_s(self, ms: float, seq: int, fwd: bool) -> str:
        a = self.args
        n_bytes = (4 if fwd else 11) * a.batch * seq * a.heads * a.dim * jnp.dtype(a.dtype).itemsize
        tb_s = n_bytes / ms / 1e9
        return f"{tb_s:.2f}" + (f" ({100 * tb_s / self.ceiling:.0f}%)" if self.ceiling else "")

    def get_inputs(self, seq):
        if seq not in self.inputs:
            a = self.args
            self.inputs[seq] = make_inputs(a.batch, seq, a.heads, a.dim, a.dtype)
        return self.inputs[seq]

    def vs_fla(self, ms, seq, pass_):
        ref = self.times.get(("fla", seq, pass_))
        return f"{ref / ms:.2f}x" if ref else ""


# ---------------------------------------------------------------------------------------------------------------
# Parts


def check_correctness(args, configs):
    """Kernels vs the fp32 XLA path on the same (bf16-rounded) inputs, for (dtype, packed) configs: the default
    tuning and the first fused-forward one (its look-back's memory ordering can only be checked on a GPU)."""
    batch, seq, heads, dim = 2, 2048 + 37, 4, args.dim
    slopes = jnp.asarray(minimax_slopes(64)[[0, 20, 40, 63]])
    keys = jax.random.split(jax.random.key(7), 3)
    h0 = jax.random.normal(keys[0], (batch, heads, dim, dim), F32)
    d_final = jax.random.normal(keys[1], (batch, heads, dim, dim), F32)
    seg = jnp.asarray(np.cumsum(np.random.default_rng(0).random((batch, seq)) < 3e-3, axis=1), jnp.int32)
    section("Correctness on this device (bf16 kernels vs the fp32 XLA path)", ["what", "out", "final state", "dq",
                                                                                "dk", "dv", "dh0", "verdict"])
    for dtype, packed in configs:
        q, k, v, do = make_inputs(batch, seq, heads, dim, dtype, seed=3)

        def loss(q, k, v, h0, attn):
            out, final = attn(q, k, v, slopes, initial_state=h0, segment_ids=seg if packed else None)
            return jnp.sum(out.astype(F32) * do.astype(F32)) + jnp.sum(final * d_final), (out, final)

        def run(attn, cast):
            fn = jax.jit(jax.value_and_grad(lambda *a: loss(*a, attn), argnums=(0, 1, 2, 3), has_aux=True))
            (_, (out, final)), grads = fn(*(cast(x) for x in (q, k, v)), h0)
            return (out, final, *grads)

        def xla(*a, **kw):
            with jax.default_matmul_precision("highest"):
                return lightning_attention(*a, **kw, impl="xla")

        def pallas(chunk, tuning):
            return lambda q, k, v, s, initial_state, segment_ids: lightning_attention_pallas_gpu(
                q, k, v, s, initial_state, segment_ids, chunk_size=chunk, interpret=args.interpret, tuning=tuning)

        ref = run(xla, lambda x: x.astype(F32))
        for label, chunk, tuning in (SWEEP[0], FUSED[0]):
            def one():
                errs = [rel(g, r) for g, r in zip(run(pallas(chunk, tuning), lambda x: x), ref)]
                tol = 5e-3 if dtype == BF16 else 1e-4
                verdict = f"{'PASS' if all(e <= tol for e in errs) else 'FAIL'} (tol {tol})"
                row(f"pallas_gpu {label} {jnp.dtype(dtype).name}{' packed' if packed else ''}, T={seq}",
                    *(f"{e:.1e}" for e in errs), verdict)
            attempt(f"correctness {label}", one)


def bench_pallas_default(run: Run, seqs, quiet_gpu):
    """The public API (default tuning), forward and forward+backward: compiled together, then timed one by one
    inside ``quiet_gpu()``."""
    slopes = jnp.asarray(minimax_slopes(run.args.heads))
    fwd, fwd_bwd = attention_fns(slopes)
    jobs = []
    for seq in seqs:
        q, k, v, do = run.get_inputs(seq)
        jobs += [(seq, "fwd", Job(fwd, q, k, v), (q, k, v)), (seq, "fwd+bwd", Job(fwd_bwd, q, k, v, do), (q, k, v, do))]
    concurrent.futures.wait([job.future for _, _, job, _ in jobs])
    section(f"Pallas (default tuning: {describe(GPU_CHUNK, DEFAULT_TUNING)})",
            ["impl", "T", "pass", "ms", "TB/s (% copy ceiling)", "compile s"])
    with quiet_gpu():
        for seq, pass_, job, inputs in jobs:
            def one():
                compiled, compile_s = job.result()
                ms = time_jax(compiled, *inputs)
                run.times[("pallas_gpu", seq, pass_)] = ms
                if seq == run.args.sweep_seq:  # the reference of the sweep rows
                    run.default_out[(seq, pass_)] = compiled(*inputs)
                row("pallas_gpu", seq, pass_, f"{ms:.3f}", run.tb_s(ms, seq, pass_ == "fwd"), f"{compile_s:.1f}")
            attempt(f"pallas_gpu T={seq} {pass_}", one)


FLA_SCRIPT = r"""
import json, sys, time, torch
from fla.ops.simple_gla import chunk_simple_gla
batch, heads, dim, seqs, slopes = json.loads(sys.argv[1])

def bench(fn, warmup=3, iters=10):  # CUDA-event median, exactly as shared/bench/anchor_torch.py
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]

g_gamma = -torch.tensor(slopes, device="cuda")
calls = []
for seq in seqs:
    shape = (batch, seq, heads, dim)
    q, k = (torch.nn.functional.silu(torch.randn(shape, device="cuda")).bfloat16() for _ in range(2))
    v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    def fwd(q=q, k=k, v=v):
        chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)
    def fwd_bwd(qg=qg, kg=kg, vg=vg, do=do):
        o, _ = chunk_simple_gla(qg, kg, vg, g_gamma=g_gamma, scale=1.0)
        o.backward(do)
    calls += [(seq, "fwd", fwd), (seq, "fwd+bwd", fwd_bwd)]
for seq, pass_, fn in calls:  # first calls: Triton autotuning (once per kernel, not per T)
    t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
    print("FLA_FIRST " + json.dumps(dict(T=seq, pass_=pass_, s=time.perf_counter() - t0)), flush=True)
print("FLA_READY", flush=True)
sys.stdin.readline()  # the parent says when the GPU is free for timing
for seq, pass_, fn in calls:
    print("FLA " + json.dumps(dict(T=seq, pass_=pass_, ms=bench(fn))), flush=True)
"""


class Fla:
    """fla's ``chunk_simple_gla`` in a subprocess. Its first calls (Triton autotuning: tens of seconds) overlap the
    parent's correctness check and compiles; it is stopped (SIGSTOP) while the parent times anything, and times its
    own calls only when the parent says so, with the GPU otherwise idle."""

    def __init__(self, run: Run, seqs):
        a = run.args
        self.run, self.t0, self.first, self.other = run, time.perf_counter(), {}, []
        self.ready = threading.Event()
        payload = json.dumps([a.batch, a.heads, a.dim, list(seqs), minimax_slopes(a.heads).tolist()])
        self.proc = subprocess.Popen([sys.executable, "-c", FLA_SCRIPT, payload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     preexec_fn=_die_with_parent)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        """Collects the subprocess's lines; only timing rows (which come while the parent waits) are printed here."""
        for line in self.proc.stdout:
            if line.startswith("FLA_FIRST "):
                r = json.loads(line[10:])
                self.first[(r["T"], r["pass_"])] = (r["s"], time.perf_counter() - self.t0)
            elif line.startswith("FLA_READY"):
                self.ready.set()
            elif line.startswith("FLA "):
                r = json.loads(line[4:])
                self.run.times[("fla", r["T"], r["pass_"])] = r["ms"]
                row("fla", r["T"], r["pass_"], f"{r['ms']:.3f}",
                    self.run.tb_s(r["ms"], r["T"], r["pass_"] == "fwd"), f"{self.first[(r['T'], r['pass_'])][0]:.1f}")
            elif "warn" not in line.lower() and line.strip():
                self.other.append(line.rstrip())

    @contextlib.contextmanager
    def paused(self):
        """Stop the subprocess (and let its queued GPU work drain) while the parent times something."""
        alive = self.proc.poll() is None and not self.ready.is_set()
        if alive:
            self.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.3)
        try:
            yield
        finally:
            if alive:
                self.proc.send_signal(signal.SIGCONT)

    def finish(self, deadline_s: float):
        """Wait for the first calls until ``deadline_s`` (seconds since start-up), then time fla or kill it."""
        while not self.ready.is_set() and self.proc.poll() is None and time.perf_counter() - START < deadline_s:
            self.ready.wait(timeout=0.5)
        firsts = ", ".join(f"T={seq} {pass_} {s:.1f} s (done {at:.0f} s after its start)"
                           for (seq, pass_), (s, at) in self.first.items())
        print(f"\nfla first calls (Triton autotuning included): {firsts or 'none finished'}", flush=True)
        section("fla chunk_simple_gla (subprocess; timed alone on the GPU)",
                ["impl", "T", "pass", "ms", "TB/s (% copy ceiling)", "first call s (autotune)"])
        if self.ready.is_set():
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            print(f"\n(fla killed {time.perf_counter() - self.t0:.0f} s after its start: not done by its deadline)",
                  flush=True)
        self.proc.wait()
        self.reader.join(timeout=5)
        if self.other:
            print("\nfla output:\n" + "\n".join("    " + line for line in self.other[-30:]), flush=True)
        ratios = [(seq, pass_, self.run.vs_fla(ms, seq, pass_)) for (impl, seq, pass_), ms in self.run.times.items()
                  if impl == "pallas_gpu"]
        if any(r for *_, r in ratios):
            section("pallas_gpu (default tuning) vs fla, same run (> 1: faster than fla)",
                    ["T", "pass", "fla ms / pallas ms"])
            for seq, pass_, ratio in ratios:
                if ratio:
                    row(seq, pass_, ratio)


def _die_with_parent():
    """Subprocess set-up: get SIGKILL when the benchmark dies (Linux), even while stopped."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def bench_decode(run: Run):
    a = run.args
    batch, heads, dim = a.decode_batch, a.heads, a.dim
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(kk, (batch, heads, dim), F32).astype(a.dtype) for kk in keys[:3])
    slopes = jnp.asarray(minimax_slopes(heads))
    floor_ms = 2 * batch * heads * dim * dim * 4 / (run.ceiling * 1e9) if run.ceiling else None
    state0 = jax.random.normal(keys[3], (batch, heads, dim, dim), F32)
    section(f"Decode step, B={batch}, H={heads}, D={dim}, fp32 state (floor: state read + written at the copy "
            f"ceiling = {floor_ms and f'{floor_ms:.4f}'} ms)", ["impl", "ms", "% of floor", "vs xla (out, state)"])
    ref = lightning_decode_step(q, k, v, slopes, state0, impl="xla")
    for impl in ("pallas_gpu", "xla"):
        def one(impl=impl):
            got = lightning_decode_step(q, k, v, slopes, state0, impl=impl)
            step = jax.jit(lambda q, k, v, s: lightning_decode_step(q, k, v, slopes, s, impl=impl), donate_argnums=3)
            state = jnp.array(state0)
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
            ms = float(np.median(samples))
            row(impl, f"{ms:.4f}", f"{100 * floor_ms / ms:.0f}%" if floor_ms else "",
                f"{rel(got[0], ref[0]):.1e}, {rel(got[1], ref[1]):.1e}")
        attempt(f"decode {impl}", one)


def bench_xla_anchor(run: Run, seq, quiet_gpu):
    a = run.args
    q, k, v, _ = run.get_inputs(seq)
    fwd, _ = attention_fns(jnp.asarray(minimax_slopes(a.heads)), impl="xla", chunk=256)  # 256: as the XLA anchor
    compiled, _ = Job(fwd, q, k, v).result()
    section("XLA chunked scan (chunk 256, plain autodiff), forward only: one warm-up + 3 calls",
            ["impl", "T", "pass", "ms", "TB/s (% copy ceiling)", "pallas_gpu (default) speed-up"])
    with quiet_gpu():
        ms = time_jax(compiled, q, k, v, warmup=1, reps=3, inner=1)
    ref = run.times.get(("pallas_gpu", seq, "fwd"))
    row("xla chunk 256", seq, "fwd", f"{ms:.3f}", run.tb_s(ms, seq, True), f"{ms / ref:.1f}x" if ref else "")


SWEEP_HEADER = ["#", "config", "fwd ms", "TB/s (% copy ceiling)", "vs default", "vs fla", "out err vs default",
                "compile s"]


class Sweep:
    """Forward tunings at one T, compiled in the background; rows printed as timed (inside ``quiet_gpu()``)."""

    def __init__(self, run: Run, seq: int, quiet_gpu):
        self.run, self.seq, self.quiet_gpu = run, seq, quiet_gpu
        self.slopes = jnp.asarray(minimax_slopes(run.args.heads))
        self.pending: list[tuple[str, int, Tuning, Job]] = []
        self.results: dict[tuple[int, Tuning], float] = {}
        self.labels: dict[tuple[int, Tuning], str] = {}
        self.fwd_bwd_jobs: dict[tuple[int, Tuning], Job] = {}

    def submit(self, configs):
        q, k, v, _ = self.run.get_inputs(self.seq)
        for label, chunk, tuning in configs:
            if (chunk, tuning) in self.labels:
                continue
            self.labels[(chunk, tuning)] = label
            fwd, _ = attention_fns(self.slopes, chunk=chunk, tuning=tuning, interpret=self.run.args.interpret)
            job = attempt(f"lowering {label}: {describe(chunk, tuning)}", lambda: Job(fwd, q, k, v))
            if job:
                self.pending.append((label, chunk, tuning, job))

    def time_pending(self, reserve: float):
        """Time the submitted configs in order; stop (leaving the rest) when ``reserve`` seconds are left. The output
        error is against the default's; a config whose output changes between calls (a race) says so."""
        q, k, v, _ = self.run.get_inputs(self.seq)
        ref = self.run.default_out.get((self.seq, "fwd"))
        default_ms = self.run.times.get(("pallas_gpu", self.seq, "fwd"))
        while self.pending:
            if not self.run.budget.allows(f"sweep rows from '{self.pending[0][0]}' on", reserve + 3):
                self.pending.clear()
                return
            label, chunk, tuning, job = self.pending.pop(0)

            def one():
                compiled, compile_s = job.result()
                first = compiled(q, k, v)
                with self.quiet_gpu():
                    ms = time_jax(compiled, q, k, v)
                self.results[(chunk, tuning)] = ms
                out = compiled(q, k, v)
                err = f"{rel_device(out, ref):.1e}" if ref is not None else ""
                if not bool(jnp.array_equal(out, first)):
                    err += f" (RACE? calls differ by {rel_device(out, first):.1e})"
                row(len(self.results), f"{label}: {describe(chunk, tuning)}{packed_note(label)}", f"{ms:.3f}",
                    self.run.tb_s(ms, self.seq, True), f"{default_ms / ms:.2f}x" if default_ms else "",
                    self.run.vs_fla(ms, self.seq, "fwd"), err, f"{compile_s:.1f}")
            attempt(f"sweep {label}", one)

    def best(self, n: int) -> list[tuple[int, Tuning]]:
        return sorted(self.results, key=self.results.get)[:n]

    def submit_fwd_bwd(self, configs):
        """Compile forward+backward of the given configs in the background."""
        q, k, v, do = self.run.get_inputs(self.seq)
        for chunk, tuning in configs:
            if (chunk, tuning) not in self.fwd_bwd_jobs:
                _, fwd_bwd = attention_fns(self.slopes, chunk=chunk, tuning=tuning, interpret=self.run.args.interpret)
                job = attempt(f"lowering forward+backward {describe(chunk, tuning)}",
                              lambda: Job(fwd_bwd, q, k, v, do))
                if job:
                    self.fwd_bwd_jobs[(chunk, tuning)] = job

    def time_fwd_bwd(self):
        """Forward+backward of the submitted configs, gradients compared with the default's."""
        q, k, v, do = self.run.get_inputs(self.seq)
        ref = self.run.default_out.get((self.seq, "fwd+bwd"))
        default_ms = self.run.times.get(("pallas_gpu", self.seq, "fwd+bwd"))
        section(f"Forward+backward of the fastest forward tunings, T={self.seq}",
                ["config", "fwd+bwd ms", "TB/s (% copy ceiling)", "vs default", "vs fla", "dq, dk, dv err vs default",
                 "compile s"])
        for (chunk, tuning), job in self.fwd_bwd_jobs.items():
            def one():
                compiled, compile_s = job.result()
                with self.quiet_gpu():
                    ms = time_jax(compiled, q, k, v, do)
                grads = compiled(q, k, v, do)
                errs = ", ".join(f"{rel_device(g, r):.1e}" for g, r in zip(grads, ref)) if ref is not None else ""
                row(f"{self.labels[(chunk, tuning)]}: {describe(chunk, tuning)}", f"{ms:.3f}",
                    self.run.tb_s(ms, self.seq, False),
                    f"{default_ms / ms:.2f}x" if default_ms else "", self.run.vs_fla(ms, self.seq, "fwd+bwd"), errs,
                    f"{compile_s:.1f}")
            if self.run.budget.allows(f"forward+backward of {describe(chunk, tuning)}", 8):
                attempt(f"sweep forward+backward {describe(chunk, tuning)}", one)

    def report_fastest(self):
        chunk, tuning = self.best(1)[0]
        label, ms = self.labels[(chunk, tuning)], self.results[(chunk, tuning)]
        fla = self.run.vs_fla(ms, self.seq, "fwd")
        print(f"\nFastest forward: {label}: {describe(chunk, tuning)}{packed_note(label)}, {ms:.3f} ms"
              + (f" ({fla} faster than fla in this run)" if fla else "") + " (see its forward+backward row).\n"
              f"To make it the default: DEFAULT_TUNING = {tuning!r} in pallas_kernels/lightning/pallas_gpu.py"
              + (f" and GPU_CHUNK = {chunk} in pallas_kernels/lightning/api.py" if chunk != GPU_CHUNK else ""),
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also T=128K (Pallas only)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tuning sweep")
    parser.add_argument("--seqs", type=str, default=None, help="comma-separated sequence lengths")
    parser.add_argument("--budget", type=float, default=250, help="seconds after start-up past which no part starts")
    parser.add_argument("--after-fla", type=float, default=50,
                        help="seconds of the budget kept for the parts after fla (fla is killed if not ready by then)")
    args = parser.parse_args()
    args.gpu = jax.default_backend() == "gpu"
    print(f"devices: {jax.devices()}, jax {jax.__version__}, start-up {time.perf_counter() - START:.1f} s", flush=True)
    if args.gpu:
        args.batch, args.heads, args.dim, args.dtype, args.decode_batch = 1, 64, 128, BF16, 64
        seqs = [8192, 32768] + ([131072] if args.long else [])
        args.interpret, sweep, sweep_reserve = False, SWEEP, 15
    else:  # a tiny interpret-mode smoke run of every part but fla
        args.batch, args.heads, args.dim, args.dtype, args.decode_batch = 1, 2, 64, F32, 2
        seqs = [256]
        fused = ("fused, 2 chunks/block", 64, dataclasses.replace(FUSED[0][2], chunks_per_block=2))  # 2 blocks
        args.interpret, sweep, sweep_reserve = True, [SWEEP[0], fused, ("BV 32", 64, Tuning(block_v=32))], 0
    if args.seqs:
        seqs = [int(s) for s in args.seqs.split(",")]
    args.sweep_seq = max([s for s in seqs if s <= 32768] or seqs[:1])
    budget = Budget(args.budget)
    run = Run(args, budget)
    fla = attempt("fla start", lambda: Fla(run, [s for s in seqs if s <= 32768])) if args.gpu else None
    quiet_gpu = fla.paused if fla else contextlib.nullcontext

    if args.gpu:
        with quiet_gpu():
            run.ceiling = attempt("copy ceiling", copy_ceiling_tb_s)
        print(f"copy ceiling: {run.ceiling and f'{run.ceiling:.2f}'} TB/s", flush=True)
    if budget.allows("correctness", 25):
        attempt("correctness bf16", lambda: check_correctness(args, [(BF16, False)]))
    if budget.allows("pallas_gpu rows", 20):
        attempt("pallas_gpu rows", lambda: bench_pallas_default(run, seqs, quiet_gpu))
    sweeper = Sweep(run, args.sweep_seq, quiet_gpu)
    if not args.no_sweep:  # compiles in the background while decode and the XLA anchor run
        attempt("sweep compile", lambda: sweeper.submit(sweep))
    if budget.allows("decode", 8):
        with quiet_gpu():
            attempt("decode", lambda: bench_decode(run))
    if budget.allows("xla anchor", 10):
        attempt("xla anchor", lambda: bench_xla_anchor(run, args.sweep_seq, quiet_gpu))
    if not args.no_sweep and budget.allows("sweep", sweep_reserve + 5):
        section(f"Sweep of forward tunings, T={args.sweep_seq} (vs default > 1: faster than the default tuning)",
                SWEEP_HEADER)
        sweeper.time_pending(sweep_reserve)
        if sweeper.results:  # the follow-ups compile while fla finishes
            chunk, tuning = sweeper.best(1)[0]
            sweeper.submit(refinements(sweeper.labels[(chunk, tuning)], chunk, tuning))
            sweeper.submit_fwd_bwd([ct for ct in sweeper.best(3) if ct != (GPU_CHUNK, DEFAULT_TUNING)][:2])
    if fla:
        attempt("fla", lambda: fla.finish(deadline_s=args.budget - args.after_fla))
    if sweeper.results:
        section(f"Sweep, second round: around the fastest, T={args.sweep_seq}", SWEEP_HEADER)
        sweeper.time_pending(sweep_reserve)
        sweeper.submit_fwd_bwd([ct for ct in sweeper.best(1) if ct != (GPU_CHUNK, DEFAULT_TUNING)])
        attempt("sweep forward+backward", sweeper.time_fwd_bwd)
        sweeper.report_fastest()
    if budget.allows("correctness packed / fp32", 25):
        attempt("correctness packed / fp32", lambda: check_correctness(args, [(BF16, True), (F32, True)]))
    print(f"\n(done in {time.perf_counter() - START:.0f} s)", flush=True)
    os._exit(0)  # do not wait for background compiles that were never needed


if __name__ == "__main__":
    main()
