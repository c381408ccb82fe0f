"""Compile the GPU lightning kernels to sm_90a machine code on a CPU-only machine (needs the ``triton`` wheel).

Each pallas_call's Triton IR (from the Pallas lowering, as on the GPU) is compiled with ``triton.compiler.compile``
for Hopper and assembled with the wheel's ``ptxas``: the kernels must compile, use wgmma, and not spill registers
at the default settings and with the fused forward (its atomics, spin loop, barriers and volatile loads
included). The GPU image compiles with the Triton inside jaxlib rather than this wheel, so this is a
strong hint rather than a proof. Run: ``pip install --target /tmp/tritonenv triton`` then
``PYTHONPATH=/tmp/tritonenv python -m pytest tests/kernels/test_lightning_triton_compile.py -m slow``.
"""

import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import lightning_attention, lightning_decode_step
from pallas_kernels.lightning import pallas_gpu

triton = pytest.importorskip("triton")


def _triton_kernels(fn, *shapes):
    """(name, ttir text, num_warps, num_stages) of every Triton pallas_call in ``fn`` lowered for CUDA."""
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import core as triton_core
    from jax._src.pallas.triton import lowering, pallas_call_registration as registration
    kernels, params = [], {}  # params: the compiler_params of the pallas_call being lowered
    lower_module, lower_call = lowering.lower_jaxpr_to_triton_module, registration.pallas_call_lowering

    def call(ctx, *args, compiler_params, **kwargs):
        params["current"] = compiler_params
        return lower_call(ctx, *args, compiler_params=compiler_params, **kwargs)

    def module(jaxpr, *args, **kwargs):
        result = lower_module(jaxpr, *args, **kwargs)
        p = params["current"]
        kernels.append((jaxpr.debug_info.func_name, result.module.operation.get_asm(), p.num_warps, p.num_stages))
        return result

    lowering.lower_jaxpr_to_triton_module = module
    pallas_core.register_lowering_rule(triton_core.CompilerParams, call, "gpu")
    try:
        jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = lower_module
        pallas_core.register_lowering_rule(triton_core.CompilerParams, lower_call, "gpu")
    return kernels


# The fused forward as the first fused entry of benchmarks/lightning_attention.py's SWEEP runs it (the default's
# 4 warps spill in the fused kernel).
FUSED = pallas_gpu.Tuning(chunks_per_block=8, block_v=64, num_warps=8, fused_forward=True)


@pytest.mark.slow
@pytest.mark.parametrize("packed,fused", [(False, False), (True, False), (False, True), (True, True)])
def test_gpu_kernels_compile_for_hopper_without_spills(monkeypatch, packed, fused, tmp_path):
    from triton.backends.compiler import GPUTarget
    if fused:
        monkeypatch.setattr(pallas_gpu, "DEFAULT_TUNING", FUSED)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    bf16 = jax.ShapeDtypeStruct((1, 4096, 4, 128), jnp.bfloat16)
    row, state = jax.ShapeDtypeStruct((8, 4, 128), jnp.bfloat16), jax.ShapeDtypeStruct((8, 4, 128, 128), jnp.float32)
    slopes = jax.ShapeDtypeStruct((4,), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

    def train(q, k, v, s, seg):
        loss = lambda q, k, v: jnp.sum(lightning_attention(
            q, k, v, s, segment_ids=seg if packed else None, impl="pallas_gpu", interpret=False)[0].astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    kernels = _triton_kernels(train, bf16, bf16, bf16, slopes, seg)
    kernels += _triton_kernels(lambda q, k, v, s, st: lightning_decode_step(q, k, v, s, st, impl="pallas_gpu",
                                                                             interpret=False),
                               row, row, row, slopes, state)
    forward = {"lightning_fused_forward"} if fused else {"lightning_output"}  # local states and scan: backward too
    assert {name for name, *_ in kernels} == forward | {"lightning_local_states", "lightning_state_scan",
                                                        "lightning_dqk", "lightning_dv", "lightning_decode"}
    for i, (name, ttir, num_warps, num_stages) in enumerate(kernels):
        path = tmp_path / f"{i}_{name}.ttir"
        path.write_text(ttir)
        compiled = triton.compiler.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                           options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = compiled.asm["ptx"]
        (tmp_path / "k.ptx").write_text(ptx)
        report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o",
                                 str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
        if name not in ("lightning_state_scan", "lightning_decode"):
            assert "wgmma" in ptx, f"{name}: no wgmma"
        if name == "lightning_fused_forward":  # the look-back's synchronisation survived compilation
            assert all(op in ptx for op in ("atom.global.gpu.acq_rel.add", "bar.sync", "ld.volatile.global")), name
        # With packed segments the default's 4 warps spill a few hundred bytes in these (exact still; README.md).
        if not (packed and not fused and name in ("lightning_output", "lightning_dqk", "lightning_dv")):
            assert " 0 bytes spill stores" in report, f"{name} spills registers:\n{report}"
