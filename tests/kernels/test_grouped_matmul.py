"""grouped_matmul kernels (Pallas interpret mode on CPU) against jax.lax.ragged_dot and its autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul, pallas_gpu, pallas_tpu, reference

M, K, N = 100, 32, 48  # m is not a multiple of any row tile
GROUP_SIZES = {  # 6 groups each
    "unaligned_with_empty_groups": [7, 0, 40, 3, 0, 25],  # sum 75 < m: rows 75.. give zeros
    "one_group_holds_almost_all": [0, 97, 1, 0, 0, 2],
    "tile_aligned_then_trailing_empty": [16, 48, 32, 4, 0, 0],
    "all_empty": [0, 0, 0, 0, 0, 0],
}
TILINGS = {"pallas_gpu": (16, 16, 16), "pallas_tpu": (16, 128, 128)}  # small tiles: many straddles


def _operands(seed, dtype, groups):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k1, (M, K), jnp.float32).astype(dtype)
    rhs = jax.random.normal(k2, (len(groups), K, N), jnp.float32).astype(dtype)
    dout = jax.random.normal(k3, (M, N), jnp.float32).astype(dtype)
    return lhs, rhs, jnp.asarray(groups, jnp.int32), dout


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(x).all(), "non-finite values in the kernel output"
    return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


def _grads(fn, lhs, rhs, group_sizes, dout):
    _, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
    return vjp(dout)


@pytest.mark.parametrize("case", GROUP_SIZES)
@pytest.mark.parametrize("impl", TILINGS)
def test_forward_matches_ragged_dot_fp32(impl, case):
    lhs, rhs, group_sizes, _ = _operands(list(GROUP_SIZES).index(case), jnp.float32, GROUP_SIZES[case])
    out = grouped_matmul(lhs, rhs, group_sizes, impl=impl, tiling=TILINGS[impl])
    ref = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5
    assert not np.asarray(out[int(group_sizes.sum()):]).any(), "rows past sum(group_sizes) must be zero"


@pytest.mark.parametrize("case", GROUP_SIZES)
@pytest.mark.parametrize("impl", TILINGS)
def test_gradients_match_ragged_dot_autodiff_fp32(impl, case):
    lhs, rhs, group_sizes, dout = _operands(list(GROUP_SIZES).index(case) + 10, jnp.float32, GROUP_SIZES[case])
    kernel = lambda x, y, s: grouped_matmul(x, y, s, impl=impl, tiling=TILINGS[impl])
    dlhs, drhs = _grads(kernel, lhs, rhs, group_sizes, dout)
    ref_dlhs, ref_drhs = _grads(jax.lax.ragged_dot, lhs, rhs, group_sizes, dout)
    assert dlhs.shape == lhs.shape and drhs.shape == rhs.shape
    assert _rel_err(dlhs, ref_dlhs) < 1e-5
    assert _rel_err(drhs, ref_drhs) < 1e-5
    empty = np.asarray(group_sizes) == 0
    assert not np.asarray(drhs)[empty].any(), "empty groups must get zero weight gradients"


@pytest.mark.parametrize("impl", TILINGS)
def test_bf16_forward_and_gradients(impl):
    lhs, rhs, group_sizes, dout = _operands(20, jnp.bfloat16, GROUP_SIZES["unaligned_with_empty_groups"])
    fn = lambda a, b, g: grouped_matmul(a, b, g, impl=impl, tiling=TILINGS[impl])
    out = fn(lhs, rhs, group_sizes)
    assert out.dtype == jnp.bfloat16
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]  # reference: the same bf16 values in fp32
    assert _rel_err(out, jax.lax.ragged_dot(*f32(lhs, rhs), group_sizes)) < 1e-2
    grads = _grads(fn, lhs, rhs, group_sizes, dout)
    ref_grads = _grads(jax.lax.ragged_dot, *f32(lhs, rhs), group_sizes, dout.astype(jnp.float32))
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == jnp.bfloat16 and _rel_err(grad, ref) < 1e-2


def test_pallas_tpu_with_several_blocks_per_dim():
    """k and n of two 128-lane blocks each and two 128-row chunks: accumulation across grid steps."""
    keys = jax.random.split(jax.random.key(24), 3)
    lhs, rhs = jax.random.normal(keys[0], (200, 256)), jax.random.normal(keys[1], (4, 256, 256))
    dout, group_sizes = jax.random.normal(keys[2], (200, 256)), jnp.array([70, 0, 91, 30], jnp.int32)
    fn = lambda a, b, g: grouped_matmul(a, b, g, impl="pallas_tpu", tiling=(64, 128, 128))
    assert _rel_err(fn(lhs, rhs, group_sizes), jax.lax.ragged_dot(lhs, rhs, group_sizes)) < 1e-5
    grads = _grads(fn, lhs, rhs, group_sizes, dout)
    for grad, ref in zip(grads, _grads(jax.lax.ragged_dot, lhs, rhs, group_sizes, dout)):
        assert _rel_err(grad, ref) < 1e-5


def test_fp32_output_from_bf16_operands():
    lhs, rhs, group_sizes, _ = _operands(21, jnp.bfloat16, GROUP_SIZES["one_group_holds_almost_all"])
    out = grouped_matmul(lhs, rhs, group_sizes, impl="pallas_gpu", preferred_element_type=jnp.float32)
    ref = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32 and _rel_err(out, ref) < 1e-5  # default tiling, fitted to k and n


@pytest.mark.parametrize("kernels", [pallas_gpu, pallas_tpu], ids=["pallas_gpu", "pallas_tpu"])
def test_transposed_grouped_matmul_kernel(kernels):
    lhs, _, group_sizes, dout = _operands(22, jnp.float32, GROUP_SIZES["unaligned_with_empty_groups"])
    tiling = kernels.DEFAULT_TILING
    if kernels is pallas_gpu:
        tiling = tiling._replace(block_m=16, block_n=16)  # several output tiles
    out = kernels.tgmm(lhs, dout, group_sizes, tiling=tiling, out_dtype=jnp.float32, interpret=True)
    ref = reference.transposed_grouped_matmul(lhs, dout, group_sizes)
    assert _rel_err(out, ref) < 1e-5


def test_auto_is_the_reference_on_cpu():
    lhs, rhs, group_sizes, _ = _operands(23, jnp.float32, GROUP_SIZES["unaligned_with_empty_groups"])
    np.testing.assert_array_equal(grouped_matmul(lhs, rhs, group_sizes), jax.lax.ragged_dot(lhs, rhs, group_sizes))


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, sizes_dtype, kwargs, match",
    [
        ((M, K, 1), (6, K, N), jnp.int32, {}, "lhs must be"),
        ((M, K), (6, K + 1, N), jnp.int32, {}, "disagree on k"),
        ((M, K), (6, K, N), jnp.float32, {}, "group_sizes must be integers"),
        ((M, K), (6, K, N), jnp.int32, {"impl": "cuda"}, "impl='cuda'"),
        ((M, 40), (6, 40, N), jnp.int32, {"impl": "pallas_gpu"}, "k=40 has no power-of-two divisor"),
        ((M, K), (6, K, 24), jnp.int32, {"impl": "pallas_gpu"}, "n=24 has no power-of-two divisor"),
        ((M, K), (6, K, N), jnp.int32, {"impl": "pallas_gpu", "tiling": (48, 16, 16)}, "block_m=48"),
        ((M, K), (6, K, N), jnp.int32, {"impl": "pallas_gpu", "tiling": (16, 8, 16)}, "block_k=8"),
        ((M, K), (6, K, N), jnp.int32, {"impl": "pallas_tpu", "tiling": (128, 100, 128)}, "block_k=100"),
        ((M, K), (6, K, N), jnp.int32, {"impl": "pallas_tpu", "tiling": (12, 128, 128)}, "block_m=12"),
    ],
)
def test_refuses_what_the_kernels_cannot_take(lhs_shape, rhs_shape, sizes_dtype, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grouped_matmul(jnp.ones(lhs_shape), jnp.ones(rhs_shape), jnp.ones(6, sizes_dtype), **kwargs)


def test_refuses_mixed_operand_dtypes():
    with pytest.raises(ValueError, match="lhs is bfloat16 but rhs is float32"):
        grouped_matmul(jnp.ones((M, K), jnp.bfloat16), jnp.ones((6, K, N)), jnp.ones(6, jnp.int32), impl="pallas_gpu")


def test_pallas_gpu_lowers_to_valid_triton_ir(monkeypatch):
    """Lower forward + backward for CUDA on this CPU machine and verify each Triton module.

    Interpret mode cannot see what only the Triton lowering does (e.g. jax 0.10 lowers jnp.where of two
    Python ints to an i1 select, which makes an invalid loop bound), so check the real lowering here.
    """
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    modules = []

    def lower_and_keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module)
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_keep)
    lhs, rhs = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16), jax.ShapeDtypeStruct((4, 128, 256), jnp.bfloat16)
    sizes, dout = jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)

    def forward_and_backward(a, b, g, d):
        out, vjp = jax.vjp(lambda x, y: grouped_matmul(x, y, g, impl="pallas_gpu", interpret=False), a, b)
        return out, vjp(d)

    jax.jit(forward_and_backward).trace(lhs, rhs, sizes, dout).lower(lowering_platforms=("cuda",))
    assert len(modules) == 3  # forward, dlhs, drhs
    for module in modules:
        assert module.operation.verify()
