"""Pallas lightning-attention kernels (GPU Triton and TPU Mosaic, CPU interpret mode) against the float64 oracle.

The interpreters initialise every output buffer with NaN, so an element a kernel never writes fails ``rel_err``.
The matrix covers seq {1, 63, 64, 65, 300, 1030}, odd head counts, head_dim 64 and 128, slopes from 1e-5 to 0.92
and the real M1 slopes of layers 0, 40 and 78, with and without initial state, packed segments, fp32 and bf16,
without taking the full cross product.
"""

import dataclasses
import importlib.util
import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_lightning_oracle import check_against_oracle, make_inputs, minimax_slopes

from pallas_kernels import lightning_attention
from pallas_kernels.lightning import pallas_gpu
from pallas_kernels.lightning.pallas_gpu import Tuning

IMPLS = ["pallas_gpu", "pallas_tpu"]

# (seq, batch, heads, head_dim, slopes (None: random 1e-5..0.92, or (layer, heads)), initial state, packed, chunk)
FP32_CASES = [
    (1, 1, 3, 64, None, True, False, 16),
    (63, 2, 1, 64, (0, [0]), False, False, 16),
    (64, 1, 3, 64, (40, [0, 31, 63]), True, False, 16),
    (65, 1, 5, 128, (78, [0, 15, 31, 47, 63]), True, True, 16),
    (300, 2, 3, 64, None, True, True, 16),
    (1030, 1, 3, 64, None, True, True, 32),
]
BF16_CASES = [
    (200, 1, 3, 128, (0, [0, 40, 63]), True, False, None),
    (1030, 1, 2, 64, (40, [5, 60]), False, True, None),
]


def _case_inputs(seq, batch, heads, dim, slopes, packed, dtype):
    slopes = None if slopes is None else minimax_slopes(slopes[0], slopes[1])
    return make_inputs(seq * 7 + heads, batch, seq, heads, dim, dtype, slopes=slopes, packed=packed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq,batch,heads,dim,slopes,with_h0,packed,chunk", FP32_CASES)
def test_fp32_matches_oracle(impl, seq, batch, heads, dim, slopes, with_h0, packed, chunk):
    x = _case_inputs(seq, batch, heads, dim, slopes, packed, jnp.float32)
    check_against_oracle(impl, x, tol=1e-5, grad_tol=1e-4, chunk_size=chunk, with_h0=with_h0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq,batch,heads,dim,slopes,with_h0,packed,chunk", BF16_CASES)
def test_bf16_matches_oracle(impl, seq, batch, heads, dim, slopes, with_h0, packed, chunk):
    x = _case_inputs(seq, batch, heads, dim, slopes, packed, jnp.bfloat16)
    check_against_oracle(impl, x, tol=5e-3, grad_tol=5e-3, chunk_size=chunk, with_h0=with_h0)


@pytest.mark.parametrize("dim,chunk", [(48, 64), (64, 24), (512, 64), (8, 16), (128, 256)])
def test_gpu_refuses_shapes_triton_cannot_compile(dim, chunk):
    x = jnp.ones((1, 64, 2, dim))
    with pytest.raises(ValueError, match="powers of two >= 16"):
        lightning_attention(x, x, x, jnp.ones(2), impl="pallas_gpu", chunk_size=chunk)


def test_tpu_refuses_unaligned_chunk():
    x = jnp.ones((1, 64, 2, 64))
    with pytest.raises(ValueError, match="multiple of 8"):
        lightning_attention(x, x, x, jnp.ones(2), impl="pallas_tpu", chunk_size=12)


@pytest.mark.parametrize("bad", ["k_shape", "v_heads", "slopes", "h0", "segments", "impl", "dtype"])
def test_api_rejects_bad_input(bad):
    q = jnp.ones((2, 16, 3, 16))
    args = dict(q=q, k=q, v=q, slopes=jnp.ones(3), initial_state=None, segment_ids=None, impl="xla")
    args |= {"k_shape": dict(k=q[:, :8]), "v_heads": dict(v=q[:, :, :2]), "slopes": dict(slopes=jnp.ones(4)),
             "h0": dict(initial_state=jnp.ones((2, 3, 16, 8))), "segments": dict(segment_ids=jnp.ones((2, 16))),
             "impl": dict(impl="cuda"), "dtype": dict(v=q.astype(jnp.bfloat16))}[bad]
    with pytest.raises(ValueError, match="lightning_attention"):
        lightning_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("slopes"), **args)


@pytest.mark.parametrize("packed,fused", [(False, False), (True, False), (True, True)])
def test_gpu_kernels_lower_to_triton_for_hopper(monkeypatch, packed, fused):
    """Lower forward and backward for CUDA (sm_90) on this CPU: catches shapes and ops Triton does not take."""
    monkeypatch.setattr(pallas_gpu, "DEFAULT_TUNING", dataclasses.replace(pallas_gpu.DEFAULT_TUNING,
                                                                          fused_forward=fused))
    shape = jax.ShapeDtypeStruct((1, 1100, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1100), jnp.int32)

    def loss(q, k, v, slopes, seg):
        out, final = lightning_attention(q, k, v, slopes, segment_ids=seg if packed else None, impl="pallas_gpu",
                                         interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    text = fwd_bwd.trace(shape, shape, shape, jax.ShapeDtypeStruct((2,), jnp.float32), seg).lower(
        lowering_platforms=("cuda",)).as_text()
    # forward 3 (local, scan, output) or 1 (fused), backward 6
    assert text.count("__gpu$xla.gpu.triton") == (7 if fused else 9)


def test_tpu_kernels_lower_to_mosaic():
    """Lower forward and backward (packed, bf16) for TPU on this CPU: the Mosaic lowering's shape and op checks."""
    shape = jax.ShapeDtypeStruct((1, 1100, 2, 128), jnp.bfloat16)

    def loss(q, k, v, slopes, seg):
        out, final = lightning_attention(q, k, v, slopes, segment_ids=seg, impl="pallas_tpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(
        shape, shape, shape, jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((1, 1100), jnp.int32)
    ).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, states recompute, fused backward


def test_auto_on_gpu_picks_triton_and_drops_chunk_sizes_it_cannot_take(monkeypatch):
    """The model passes its block_size (256 in M1) as chunk_size: auto must still run the Triton kernels."""
    from pallas_kernels.lightning import api
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    assert api._resolve("auto", 128, 128, 256) == ("pallas_gpu", None)
    assert api._resolve("auto", 128, 128, 128) == ("pallas_gpu", 128)
    assert api._resolve("auto", 48, 48, 256) == ("xla", 256)
    assert api._resolve("pallas_gpu", 128, 128, 256) == ("pallas_gpu", 256)  # explicit: refused later, loudly


# Non-default GPU tunings (benchmarks/lightning_attention.py sweeps them): different tiles per kernel, chunk 128,
# many blocks (the state scan's unrolled steps: 32 blocks -> 4 per step), padding; and the fused forward (ticket
# order, look-back across 32 and 16 blocks, several batches, heads and v tiles, packed segments, the initial state;
# its gradients come from the three-kernel backward). Interpret mode ignores warps and stages, which only change the
# compiled code (checked by the slow test below), and runs the fused kernel's programs one at a time in ticket
# order, so it checks the indexing and the math of the look-back, not its memory ordering (a GPU question).
TUNING_CASES = [  # (seq, batch, heads, dim, chunk, tuning, packed)
    (1000, 1, 2, 64, 16, Tuning(chunks_per_block=2, block_v=16, local_block_v=32, block_k=32), False),
    (1000, 1, 2, 64, 16, Tuning(chunks_per_block=2, block_v=32, local_block_v=16, block_k=16, num_stages=3), True),
    (1100, 1, 1, 128, 128, Tuning(chunks_per_block=4, block_v=32, local_block_v=128, num_warps=4), True),
    (1000, 2, 3, 64, 16, Tuning(chunks_per_block=2, block_v=32, fused_forward=True), False),
    (1000, 2, 3, 64, 16, Tuning(chunks_per_block=4, block_v=16, num_warps=4, fused_forward=True), True),
    (1100, 1, 1, 128, 128, Tuning(chunks_per_block=2, block_v=128, fused_forward=True), True),
]


@pytest.mark.parametrize("seq,batch,heads,dim,chunk,tuning,packed", TUNING_CASES)
def test_gpu_tunings_match_oracle(monkeypatch, seq, batch, heads, dim, chunk, tuning, packed):
    monkeypatch.setattr(pallas_gpu, "DEFAULT_TUNING", tuning)
    x = make_inputs(seq + dim, batch, seq, heads, dim, jnp.float32, packed=packed)
    check_against_oracle("pallas_gpu", x, tol=1e-5, grad_tol=1e-4, chunk_size=chunk)


def test_gpu_fused_forward_is_one_kernel():
    """The fused tuning really swaps the forward's three pallas_calls for the single-pass one."""
    x = jnp.ones((1, 100, 2, 16))
    calls = lambda tuning: re.findall(r"name=(lightning_\w+)", str(jax.make_jaxpr(
        lambda x: pallas_gpu.lightning_attention_pallas_gpu(x, x, x, jnp.ones(2), None, None, chunk_size=16,
                                                            interpret=True, tuning=tuning))(x)))
    assert calls(Tuning(fused_forward=True)) == ["lightning_fused_forward"]
    assert calls(Tuning()) == ["lightning_local_states", "lightning_state_scan", "lightning_output"]


def test_gpu_refuses_bad_tuning():
    x = jnp.ones((1, 64, 2, 64))
    with pytest.raises(ValueError, match="bad tuning"):
        pallas_gpu.lightning_attention_pallas_gpu(x, x, x, jnp.ones(2), None, None, chunk_size=16, interpret=True,
                                                  tuning=Tuning(block_v=48))


def _load_benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "lightning_attention.py"
    spec = importlib.util.spec_from_file_location("lightning_attention_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


@pytest.mark.slow
def test_benchmark_sweep_tunings_compile_for_hopper_without_spills(tmp_path):
    """Every tuning the benchmark sweep can run (its list and the refinements around each entry), forward and
    backward, compiles to sm_90a with the ``triton`` wheel (see test_lightning_triton_compile.py) without register
    spills and within shared memory, so no device time goes to a configuration that cannot run well; with packed
    segments, exactly the entries the benchmark marks as spilling spill."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from test_lightning_triton_compile import _triton_kernels
    bench = _load_benchmark()
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    bf16 = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
    slopes = jax.ShapeDtypeStruct((2,), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    reports = {}  # (ttir, num_warps, num_stages) -> problem or ""

    def problems(chunk, tuning, packed):
        def train(q, k, v, s, seg):
            loss = lambda q, k, v: jnp.sum(pallas_gpu.lightning_attention_pallas_gpu(
                q, k, v, s, None, seg if packed else None, chunk_size=chunk, interpret=False,
                tuning=tuning)[0].astype(jnp.float32))
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

        found = []
        for name, ttir, num_warps, num_stages in _triton_kernels(train, bf16, bf16, bf16, slopes, seg):
            key = (ttir, num_warps, num_stages)
            if key not in reports:
                path = tmp_path / f"{name}.ttir"
                path.write_text(ttir)
                compiled = triton.compiler.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                                   options=dict(num_warps=num_warps, num_stages=num_stages))
                (tmp_path / "k.ptx").write_text(compiled.asm["ptx"])
                report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o",
                                         str(tmp_path / "k.cubin")], capture_output=True, text=True,
                                        check=True).stderr
                spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
                smem = compiled.metadata.shared
                reports[key] = f"{name}: {spills} bytes spilled, {smem} bytes of shared memory" if (
                    spills or smem > SMEM_LIMIT) else ""
            found += [reports[key]] if reports[key] else []
        return found

    configs = [*bench.SWEEP] + [r for entry in bench.SWEEP for r in bench.refinements(*entry)]
    failures = [f"{label}, chunk {chunk}, {tuning}: {p}" for label, chunk, tuning in configs
                for p in problems(chunk, tuning, packed=False)]
    assert not failures, "\n".join(failures)
    spill_packed = {label for label, chunk, tuning in bench.SWEEP if problems(chunk, tuning, packed=True)}
    assert spill_packed == bench.SPILLS_WHEN_PACKED
