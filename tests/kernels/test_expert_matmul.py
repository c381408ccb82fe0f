"""expert_matmul kernels (Pallas interpret mode on CPU) against a float64 oracle, plus their real lowerings."""

import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.expert_matmul import expert_matmul

IMPLS = ["reference", "pallas_gpu", "pallas_tpu"]


def _operands(seed, dtype, tokens=3, top_k=2, experts=5, k=256, n=384):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (tokens, k), jnp.float32).astype(dtype)
    w = jax.random.normal(k2, (experts, k, n), jnp.float32).astype(dtype)
    ids = jax.random.randint(k3, (tokens, top_k), 0, experts)
    return x, w, ids.at[0].set(jnp.array([experts - 1, 0])[:top_k])  # the first and last expert both appear


def _oracle(x, w, ids):
    w64 = np.asarray(w, np.float64)[np.asarray(ids)]
    return np.einsum("tk,tjkn->tjn", np.asarray(x, np.float64), w64)


def _rel_err(x, ref):
    x = np.asarray(x, np.float64)
    assert np.isfinite(x).all(), "non-finite output"
    return np.abs(x - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-3)])
def test_matches_float64_oracle(impl, dtype, tol):
    x, w, ids = _operands(1, dtype)
    out = expert_matmul(x, w, ids, impl=impl)
    assert out.shape == (3, 2, 384) and out.dtype == dtype
    assert _rel_err(out, _oracle(x, w, ids)) < tol


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_down_projection_layout_and_fp32_output(impl):
    """The MoE's second product: one expert per row of [tokens * top_k, k] (top_k = 1), fp32 out of bf16 in."""
    x, w, ids = _operands(2, jnp.bfloat16, tokens=6, top_k=1, k=384, n=256)
    out = expert_matmul(x, w, ids, impl=impl, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    assert _rel_err(out, _oracle(x, w, ids)) < 1e-5


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_gradients_match_reference_autodiff(impl):
    x, w, ids = _operands(3, jnp.float32)
    dout = jax.random.normal(jax.random.key(4), (3, 2, 384))
    grads = jax.grad(lambda a, b: jnp.vdot(expert_matmul(a, b, ids, impl=impl), dout), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda a, b: jnp.vdot(expert_matmul(a, b, ids, impl="reference"), dout), argnums=(0, 1))(x, w)
    for g, r in zip(grads, ref):
        assert _rel_err(g, np.asarray(r, np.float64)) < 1e-6


@pytest.mark.parametrize("bad, match", [
    (dict(x=jnp.ones((3, 128))), "expected x"),
    (dict(ids=jnp.zeros((3, 2), jnp.float32)), "must be integers"),
    (dict(w=jnp.ones((5, 256, 24)), impl="pallas_gpu"), "n=24 has no power-of-two divisor >= 16"),
    (dict(w=jnp.ones((5, 256, 64)), impl="pallas_tpu"), "n=64 has no power-of-two divisor >= 128"),
    (dict(impl="cuda"), "not one of"),
])
def test_rejects_bad_input(bad, match):
    x, w, ids = _operands(5, jnp.float32)
    args = {"x": x, "w": w, "ids": ids, "impl": "reference"} | bad
    with pytest.raises(ValueError, match=match):
        expert_matmul(args["x"], args["w"], args["ids"], impl=args["impl"])


@pytest.mark.parametrize("impl, blocks", [("pallas_gpu", (64, 16)), ("pallas_tpu", (128, 128))])
def test_explicit_blocks(impl, blocks):
    x, w, ids = _operands(7, jnp.float32)
    out = expert_matmul(x, w, ids, impl=impl, blocks=blocks)
    assert _rel_err(out, _oracle(x, w, ids)) < 1e-5
    with pytest.raises(ValueError, match="block_n=24 must be a power of two"):
        expert_matmul(x, w, ids, impl=impl, blocks=(blocks[0], 24))


def test_gpu_panels_narrow_until_the_gpu_is_full():
    from pallas_kernels.expert_matmul.kernel import default_blocks
    assert default_blocks("gpu", 2, 2048, 3072) == (256, 16)  # decode at batch 1: 384 programs
    assert default_blocks("gpu", 16, 2048, 3072) == (256, 64)  # batch 8: 768 programs
    assert default_blocks("gpu", 2, 96, 48) == (32, 16)


def test_auto_falls_back_to_the_reference_for_untileable_sizes(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, w, ids = _operands(6, jnp.float32, n=24)
    out = expert_matmul(x, w, ids, interpret=True)
    assert _rel_err(out, _oracle(x, w, ids)) < 1e-5


def _lower(impl, platform):
    x, w = jax.ShapeDtypeStruct((2, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((8, 2048, 3072), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 2), jnp.int32)
    fn = jax.jit(lambda a, b, e: expert_matmul(a, b, e, impl=impl, interpret=False))
    return fn.trace(x, w, ids).lower(lowering_platforms=(platform,)).as_text()


def test_gpu_kernel_lowers_to_triton_and_tpu_kernel_to_mosaic():
    assert _lower("pallas_gpu", "cuda").count("__gpu$xla.gpu.triton") == 1
    assert _lower("pallas_tpu", "tpu").count("tpu_custom_call") == 1


@pytest.mark.slow
def test_gpu_kernel_compiles_for_hopper_without_spills(tmp_path):
    """Needs the triton wheel (see tests/kernels/test_lightning_triton_compile.py for the setup)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from test_lightning_triton_compile import _triton_kernels

    x, w = jax.ShapeDtypeStruct((2, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((8, 2048, 3072), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 2), jnp.int32)
    [(name, ttir, num_warps, num_stages)] = _triton_kernels(
        lambda a, b, e: expert_matmul(a, b, e, impl="pallas_gpu", interpret=False), x, w, ids)
    (tmp_path / "k.ttir").write_text(ttir)
    compiled = triton.compiler.compile(str(tmp_path / "k.ttir"), target=GPUTarget("cuda", 90, 32),
                                       options=dict(num_warps=num_warps, num_stages=num_stages))
    (tmp_path / "k.ptx").write_text(compiled.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o",
                             str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    assert name == "expert_matmul" and " 0 bytes spill stores" in report, report
