"""Generation speed: prefill and decode tokens/s of m1jax beside transformers, measured in one run.

GPU: the m1-1.5b preset in bf16 (the model of reference/measured.md's anchors): prefill of 8,192 tokens at batch 1,
then a 512-token prompt and 128 new tokens at batch 1 and 8 (greedy, no stop). CPU: m1-tiny in fp32, shorter.
"decode" is the jitted while_loop alone (one dispatch for all new tokens); "generate" adds the prefill, as
transformers' `generate` does. transformers decodes fewer tokens (its per-token rate is what is compared).
Prints a markdown table. Every row is guarded (a failure prints its traceback and the rest runs); rows run most
valuable first, and rows left after --budget-s are skipped.

    python benchmarks/generate.py                       # GPU: m1-1.5b; CPU: m1-tiny
    python benchmarks/generate.py --preset m1-small --budget-s 60 --dispatch ragged dense
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m1jax.cache import init_cache  # noqa: E402
from m1jax.config import get_preset  # noqa: E402
from m1jax.generation import Generation, prefill  # noqa: E402
from m1jax.model import init_model  # noqa: E402

GPU = dict(preset="m1-1.5b", dtype="bfloat16", prefill_len=8192, prompt_len=512, new_tokens=128, hf_new_tokens=32,
           budget_s=85)
CPU = dict(preset="m1-tiny", dtype="float32", prefill_len=512, prompt_len=64, new_tokens=64, hf_new_tokens=16,
           budget_s=150)
TARGETS = {"gpu": {("decode", 1): 2_000, ("prefill", 1): 300_000}, "cpu": {}}  # tokens/s on an H200


def median_seconds(fn, reps: int = 3) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- m1jax ---------------------------------------------------------------------------------------------------
def m1_prefill(model, batch: int, length: int, dispatch: str) -> float:
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, model.config.vocab_size)

    def run():
        logits = prefill(model, init_cache(model.config, batch, length), tokens, chunk_size=length,
                         dispatch=dispatch)[0]
        jax.block_until_ready(logits)

    return batch * length / median_seconds(run)


def m1_generate(model, batch: int, prompt_len: int, new: int, dispatch: str) -> tuple[float, float]:
    """(decode tokens/s, prefill + decode tokens/s) over `new` greedy tokens per row."""
    prompts = np.asarray(jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, model.config.vocab_size))
    times = []
    for _ in range(3):  # the first run compiles
        start = time.perf_counter()
        run = Generation(model, prompts, max_new_tokens=new, stop_token_ids=(), dispatch=dispatch)
        jax.block_until_ready(run.state.logits)
        prefilled = time.perf_counter()
        run.step()
        assert int(run.state.step) == new
        times.append((prefilled - start, time.perf_counter() - prefilled))
    prefill_s = statistics.median(t[0] for t in times[1:])
    decode_s = statistics.median(t[1] for t in times[1:])
    return batch * new / decode_s, batch * new / (prefill_s + decode_s)


# ---- transformers --------------------------------------------------------------------------------------------
def hf_model(config, device: str):
    import torch
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    hf = MiniMaxConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        layer_types=["linear_attention" if t == "lightning" else "full_attention" for t in config.layer_types],
        block_size=config.block_size, num_local_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, hidden_act=config.hidden_act,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        full_attn_alpha_factor=config.full_attn_alpha, linear_attn_alpha_factor=config.linear_attn_alpha,
        mlp_alpha_factor=config.mlp_alpha, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
        eos_token_id=None)
    if device == "cpu":
        hf._experts_implementation = "eager"  # grouped_mm needs 16-byte strides on CPU
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[config.dtype]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return MiniMaxForCausalLM(hf).eval()
    finally:
        torch.set_default_dtype(default)


def torch_seconds(fn, device: str, reps: int = 3) -> float:
    import torch

    def synced():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    return median_seconds(synced, reps)


def hf_prefill(model, batch: int, length: int, device: str) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    with torch.no_grad():
        return torch_seconds(lambda: model(input_ids=ids, logits_to_keep=1), device)


def hf_generate(model, batch: int, prompt_len: int, new: int, device: str) -> tuple[float, float]:
    """(decode tokens/s with the prefill time taken out, prefill + decode tokens/s)."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    with torch.no_grad():
        total = torch_seconds(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                     min_new_tokens=new, do_sample=False), device)
    first = hf_prefill(model, batch, prompt_len, device)  # the prefill inside generate (and its first token)
    return batch * (new - 1) / max(total - first, 1e-9), batch * new / total


# ---- the run -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    platform = jax.default_backend()
    defaults = GPU if platform == "gpu" else CPU
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=defaults["preset"])
    parser.add_argument("--dtype", default=defaults["dtype"])
    parser.add_argument("--prefill-len", type=int, default=defaults["prefill_len"])
    parser.add_argument("--prompt-len", type=int, default=defaults["prompt_len"])
    parser.add_argument("--new-tokens", type=int, default=defaults["new_tokens"])
    parser.add_argument("--hf-new-tokens", type=int, default=defaults["hf_new_tokens"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dispatch", nargs="+", default=["auto", "ragged"],
                        help="MoE dispatches for the decode rows (auto, or m1jax.layers.moe.DISPATCH; the prompt of a "
                             "decode row is prefilled with the same one), one m1jax row each; prefill rows use auto")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=1 if platform == "cpu" else None,
                        help="torch CPU threads (default on CPU: 1; more threads collapse on a loaded machine)")
    parser.add_argument("--budget-s", type=float, default=defaults["budget_s"])
    args = parser.parse_args(argv)

    start = time.perf_counter()
    config = get_preset(args.preset).replace(dtype=args.dtype)
    device = {"gpu": "cuda"}.get(platform, "cpu")
    print(f"# generate: {args.preset} ({config.dtype}) on {jax.devices()[0].device_kind}; jax {jax.__version__}; "
          f"lightning impl {config.lightning_impl}\n", flush=True)
    model = init_model(config, seed=0)
    hf = {}

    def transformers_model():
        if "model" not in hf:
            if args.torch_threads:
                import torch
                torch.set_num_threads(args.torch_threads)
            hf["model"] = hf_model(config, device)
        return hf["model"]

    rows = []  # (key, label, m1jax measurement given a dispatch, transformers measurement)
    for b in args.batches:
        rows.append((("decode", b), f"decode, {args.prompt_len}-token prompt",
                     lambda d, b=b: m1_generate(model, b, args.prompt_len, args.new_tokens, d),
                     lambda b=b: hf_generate(transformers_model(), b, args.prompt_len, args.hf_new_tokens, device)))
        if b == args.batches[0]:
            rows.append((("prefill", b), f"prefill {args.prefill_len} tokens",
                         lambda d, b=b: (m1_prefill(model, b, args.prefill_len, d),),
                         lambda b=b: (b * args.prefill_len / hf_prefill(transformers_model(), b, args.prefill_len,
                                                                          device),)))

    print("| what | batch | m1jax MoE dispatch | m1jax tok/s | transformers tok/s | m1jax / transformers |")
    print("|---|---|---|---|---|---|", flush=True)
    results = {}
    over = lambda: time.perf_counter() - start > args.budget_s
    for key, what, ours, theirs in rows:
        names = [what] if key[0] == "prefill" else [what.replace("decode", "decode only"),
                                                     what.replace("decode", "prefill + decode")]
        mine = {}
        for dispatch in args.dispatch if key[0] == "decode" else ["auto"]:
            mine[dispatch] = guarded(lambda: ours(dispatch)) if not over() else "skipped (budget)"
        other = None if args.no_transformers else guarded(theirs) if not over() else "skipped (budget)"
        for i, name in enumerate(names):
            for dispatch, got in mine.items():
                a, c = _value(got, i), _value(other, i)
                ratio = f"{a / c:.1f}x" if isinstance(a, float) and isinstance(c, float) else ""
                print(f"| {name} | {key[1]} | {dispatch} | {_fmt(a)} | {_fmt(c)} | {ratio} |", flush=True)
        best = max((g[0] for g in mine.values() if isinstance(g, tuple)), default=None)
        results[key] = (best, other[0] if isinstance(other, tuple) else None)

    print()
    for key, target in TARGETS[platform if platform in TARGETS else "cpu"].items():
        value = results.get(key, (None, None))[0]
        print(f"- target {key[0]} batch {key[1]} >= {target:,} tok/s: {_fmt(value)} "
              f"({'met' if value and value >= target else 'NOT met'})")
    if platform == "cpu" and ("decode", 1) in results:
        mine, other = results[("decode", 1)]
        if mine and other:
            ratio = mine / other
            verdict = "met" if ratio >= 10 else "NOT met"
            print(f"- target CPU decode batch 1 >= 10x transformers (best dispatch): {ratio:.1f}x ({verdict})")
    print(f"\n(total {time.perf_counter() - start:.0f} s; transformers decodes {args.hf_new_tokens} tokens, m1jax "
          f"{args.new_tokens}; decode-only transformers rate = generate minus one prefill of the prompt; "
          f"torch threads: {args.torch_threads or 'default'})")
    return 0


def guarded(fn):
    """fn() or "failed" (with the traceback printed)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        return "failed"


def _value(got, i):
    return float(got[i]) if isinstance(got, tuple) else got


def _fmt(x) -> str:
    return "" if x is None else x if isinstance(x, str) else f"{x:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
