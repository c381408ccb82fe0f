"""MoE layer speed: one M1-shaped MoE layer (routing + experts), tokens/s per dispatch, against the bf16 matmul
ceiling (jnp.dot side^3) measured in the same run.

hidden 2048, 32 experts, top-2, expert width 3072, bf16; 16,384 tokens on GPU, fewer on CPU (--tokens; the
dense reference runs at most --dense-tokens there). Dispatches: dense (every expert on every token, the
reference), ragged (sorted tokens, jax.lax.ragged_dot), ragged with the Pallas grouped matmul (GPU), and
expert parallel: over 8 virtual CPU devices (padded all_to_all transport) or a 1-device GPU mesh (the local
path: an expert axis of size 1 exchanges nothing; Pallas grouped matmul), forward and forward+backward.
"TFLOP/s" counts the routed work only, 2*tokens*(hidden*E + top_k*3*hidden*width) per forward (3x with the
backward), for every row, so the dense row's figure is its speed, not its utilisation. Errors: forward rows
against the dense reference on the tokens it ran, fwd+bwd rows against ragged's output and gradients.
Every row is guarded (a failure prints its traceback and the rest run); rows left after --budget-s are skipped.

    python benchmarks/moe.py                 # GPU: 16K tokens; CPU: 64 tokens, EP on 8 virtual devices
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # CPU EP rows; no effect on GPU

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m1jax.layers.moe import experts_dense, experts_ragged, route  # noqa: E402
from m1jax.layers.moe_ep import ExpertParallel  # noqa: E402
from m1jax.sharding import logical_spec, make_mesh  # noqa: E402
from timing import median_seconds, rel_err  # noqa: E402

HIDDEN, EXPERTS, TOP_K, WIDTH = 2048, 32, 2, 3072


def moe_layer(experts_fn):
    """(params, x [tokens, hidden]) -> y: routing plus one expert dispatch."""

    def layer(params, x):
        _, _, weights, experts = route(x, params["router"], TOP_K)
        return experts_fn(x, params["w1"], params["w3"], params["w2"], weights, experts, jax.nn.silu)

    return layer


def expert_parallel(dispatch: ExpertParallel):
    return lambda *args: dispatch(*args, token_mask=jnp.ones(args[0].shape[0], bool))[0]


def with_backward(layer):
    """(params, x, dy) -> (y, (dparams, dx))."""

    def run(params, x, dy):
        y, vjp = jax.vjp(layer, params, x)
        return y, vjp(dy)

    return run


def init(tokens: int, dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    params = {
        "router": jax.random.normal(keys[0], (HIDDEN, EXPERTS), jnp.float32) / np.sqrt(HIDDEN),
        "w1": (jax.random.normal(keys[1], (EXPERTS, HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(dtype),
        "w3": (jax.random.normal(keys[2], (EXPERTS, HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(dtype),
        "w2": (jax.random.normal(keys[3], (EXPERTS, WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(dtype),
    }
    x = jax.random.normal(keys[4], (tokens, HIDDEN), dtype)
    dy = jax.random.normal(keys[5], (tokens, HIDDEN), dtype)
    return params, x, dy


def place(mesh, params, x, dy):
    """Parameters and tokens in their shardings on `mesh` (m1jax.sharding rules)."""
    spec = lambda *names: NamedSharding(mesh, logical_spec(names, mesh.shape))
    put = jax.device_put
    params = {"router": put(params["router"], spec("embed", "router_experts")),
              **{w: put(params[w], spec("experts", "embed", "mlp")) for w in ("w1", "w3")},
              "w2": put(params["w2"], spec("experts", "mlp", "embed"))}
    return params, put(x, spec("tokens", "act_embed")), put(dy, spec("tokens", "act_embed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, help="tokens per call (default: 16384 on GPU, 1024 on CPU)")
    parser.add_argument("--dense-tokens", type=int, help="tokens for the dense reference (default: GPU all, CPU 256)")
    parser.add_argument("--budget-s", type=float, default=55.0, help="skip the rows left after this many seconds")
    args = parser.parse_args()

    began = time.perf_counter()
    platform = jax.default_backend()
    gpu = platform == "gpu"
    tokens = args.tokens or (16384 if platform != "cpu" else 64)
    dense_tokens = min(tokens, args.dense_tokens or (tokens if platform != "cpu" else 64))
    side = 8192 if platform != "cpu" else 1024
    dtype = jnp.bfloat16
    flops_per_token = 2 * (HIDDEN * EXPERTS + TOP_K * 3 * HIDDEN * WIDTH)
    print(f"# MoE layer: {jax.devices()[0].device_kind} x{len(jax.devices())}, jax {jax.__version__}")
    print(f"hidden {HIDDEN}, {EXPERTS} experts, top-{TOP_K}, width {WIDTH}, bf16, {tokens} tokens "
          f"(dense reference: {dense_tokens})\n")

    params, x, dy = init(tokens, dtype)
    rows = []  # dicts: name, devices, tokens, status, seconds, tflops, out, against (row name), err

    def row(name, fn, inputs, n_tokens, devices=1, backward=False, against=None, mesh=None, work=None):
        r = dict(name=name, devices=devices, tokens=n_tokens, status="ok", seconds=None, tflops=None, out=None,
                 against=against, err=None)
        rows.append(r)
        if time.perf_counter() - began > args.budget_s:
            r["status"] = "skipped (time budget)"
            return
        try:
            jitted = jax.jit(fn)
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                r["seconds"] = median_seconds(jitted, *inputs)
                r["out"] = jitted(*inputs) if against or name in referenced else None
            work = work or n_tokens * flops_per_token * (3 if backward else 1)
            r["tflops"] = work / r["seconds"] / 1e12
            print(f"  {name} ({devices} dev, {n_tokens} tokens): {r['seconds'] * 1e3:.3f} ms, "
                  f"{r['tflops']:.3g} TFLOP/s", flush=True)  # survives a timeout kill
        except Exception:  # one failing dispatch must not stop the others
            print(f"--- {name} failed:", file=sys.stderr)
            traceback.print_exc()
            r["status"] = "FAILED"

    dense, ragged_bwd = "dense (reference)", "ragged fwd+bwd"
    referenced = {dense, ragged_bwd}
    a, b = (jax.random.normal(k, (side, side), dtype) for k in jax.random.split(jax.random.key(1)))
    row(f"ceiling: jnp.dot {side}^3", jnp.dot, (a, b), None, work=2 * side**3)
    ceiling = rows[-1]["tflops"] or float("nan")
    del a, b

    ragged = moe_layer(lambda *a: experts_ragged(*a, grouped_matmul=jax.lax.ragged_dot))
    row("ragged (jax.lax.ragged_dot)", ragged, (params, x), tokens, against=dense)
    if gpu:
        from pallas_kernels.grouped_matmul import grouped_matmul
        pallas = moe_layer(lambda *a: experts_ragged(
            *a, grouped_matmul=lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, impl="pallas_gpu")))
        row("ragged + Pallas grouped_matmul", pallas, (params, x), tokens, against=dense)
    ep_mesh = make_mesh(devices=jax.devices()[:1]) if gpu else make_mesh(expert=-1)
    ep_inputs = place(ep_mesh, params, x, dy)
    ep_name = f"expert parallel ({'1-device mesh: local, Pallas gmm' if gpu else 'padded all_to_all, ragged_dot'})"
    ep_layer = moe_layer(expert_parallel(ExpertParallel()))
    row(ep_name, ep_layer, ep_inputs[:2], tokens, ep_mesh.size, against=dense, mesh=ep_mesh)
    row(dense, moe_layer(experts_dense), (params, x[:dense_tokens]), dense_tokens)

    row(ragged_bwd, with_backward(ragged), (params, x, dy), tokens, backward=True)
    if gpu:
        row("ragged + Pallas fwd+bwd", with_backward(pallas), (params, x, dy), tokens, backward=True,
            against=ragged_bwd)
    row(f"{ep_name} fwd+bwd", with_backward(ep_layer), ep_inputs, tokens, ep_mesh.size, backward=True,
        against=ragged_bwd, mesh=ep_mesh)

    outputs = {r["name"]: r["out"] for r in rows if r["out"] is not None}
    for r in rows:
        if r["out"] is not None and r["against"] in outputs:
            want = outputs[r["against"]]
            r["err"] = rel_err(r["out"][:dense_tokens] if r["against"] == dense else r["out"], want)

    print("\n| dispatch | devices | tokens | status | ms | tokens/s | TFLOP/s | of ceiling | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["name"], str(r["devices"]), str(r["tokens"] or ""), r["status"]]
        if r["seconds"] is None:
            cells += [""] * 4
        else:
            cells += [f"{r['seconds'] * 1e3:.3f}", f"{r['tokens'] / r['seconds']:,.0f}" if r["tokens"] else "",
                      f"{r['tflops']:.3g}", f"{100 * r['tflops'] / ceiling:.0f}%"]
        cells.append("" if r["err"] is None else f"{r['err']:.1e}")
        print("| " + " | ".join(cells) + " |")
    forward = [r for r in rows[1:] if r["tflops"] and "fwd+bwd" not in r["name"] and r["name"] != dense]
    if forward:
        best = max(forward, key=lambda r: r["tflops"])
        print(f"\nbest MoE layer forward: {best['name']} at {100 * best['tflops'] / ceiling:.0f}% of the bf16 "
              f"matmul ceiling measured here ({ceiling:.3g} TFLOP/s); target on H200: >= 40%.")
    print(f"Total {time.perf_counter() - began:.0f} s.")


if __name__ == "__main__":
    main()
