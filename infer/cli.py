"""`m1jax generate`: generate from a prompt, streaming the text to stdout as it is produced.

Streaming runs the jitted decode loop in segments of `--segment` tokens (one device dispatch each) and prints
each segment's text; without a tokenizer (presets) the prompt is token ids and the output is printed as ids.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from m1jax.loading import PRESET_PREFIX


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a model directory (HF safetensors or orbax) or preset:NAME "
                             "(default: the embedded default model)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json / SentencePiece .model or a directory holding one "
                             "(default: the one in the model directory)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill call")
    parser.add_argument("--mesh", default="",
                        help="shard the model and the batch over all devices on this mesh: AXIS=SIZE,... with axes "
                             "data, fsdp, context, expert, tensor, one size may be -1 (e.g. expert=4,tensor=-1); "
                             "default: one device")


def load_model_and_tokenizer(model_arg: str | None, tokenizer_arg: str | None, dtype: str | None, mesh_arg: str = ""):
    """(model, tokenizer or None, a display name, the mesh or None). The tokenizer defaults to the one beside the
    weights; with `mesh_arg` (the --mesh flag) the parameters are loaded straight into their shardings."""
    from m1jax.loading import from_pretrained
    from m1jax.sharding import ShardingError, make_mesh, parse_mesh
    from m1jax.tokenizer import load_tokenizer

    if model_arg is None:
        try:
            from m1jax.default_model import default_model_path
        except ImportError:
            raise SystemExit("error: the embedded default model is not available in this install; "
                             "pass --model PATH or --model preset:NAME") from None
        model_arg = str(default_model_path())
    try:
        mesh = make_mesh(**parse_mesh(mesh_arg)) if mesh_arg else None
        model = from_pretrained(model_arg, dtype=dtype, mesh=mesh)
    except ShardingError as e:
        raise SystemExit(f"error: --mesh {mesh_arg!r}: {e}") from None
    tokenizer = None
    if tokenizer_arg is not None:
        tokenizer = load_tokenizer(tokenizer_arg)
    elif not model_arg.startswith(PRESET_PREFIX):
        directory = Path(model_arg)
        if (directory / "tokenizer.json").is_file() or any(directory.glob("*.model")):
            tokenizer = load_tokenizer(directory)
    name = model_arg[len(PRESET_PREFIX):] if model_arg.startswith(PRESET_PREFIX) else Path(model_arg).name
    return model, tokenizer, name, mesh


def _prompt_ids(text: str, tokenizer, chat: bool, system: str | None) -> list[int]:
    if tokenizer is None:
        if chat:
            raise SystemExit("error: --chat needs a tokenizer (this model has none; pass --tokenizer)")
        try:
            return [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise SystemExit("error: this model has no tokenizer, so the prompt must be token ids "
                             "(e.g. --prompt '1 2 3'); pass --tokenizer to use text") from None
    if chat:
        from m1jax.chat_template import render_chat
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = render_chat(messages)
    return tokenizer.encode(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m1jax generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (token ids when the model has no tokenizer)")
    source.add_argument("--prompt-file", help="read the prompt from this file ('-': stdin)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of M1's chat template")
    parser.add_argument("--system", default=None, help="system prompt (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (M1's recommendation: 1.0)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (M1's recommendation: 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--thinking-budget", type=int, default=None,
                        help="max tokens inside <think>...</think>; then </think> is forced")
    parser.add_argument("--expert-threshold", type=float, default=None,
                        help="skip a selected expert whose routing weight is below this (off by default)")
    parser.add_argument("--segment", type=int, default=8, help="tokens per decode dispatch between prints")
    parser.add_argument("--show-routing", action="store_true", help="print per-layer expert counts to stderr")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.segment < 1:
        parser.error("--max-new-tokens must be >= 0 and --segment >= 1")

    from m1jax.generation import Generation

    model, tokenizer, _, mesh = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.mesh)
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            parser.error(f"--prompt-file {path} does not exist")
        text = path.read_text()
    prompt = _prompt_ids(text, tokenizer, args.chat, args.system)
    try:
        start = time.perf_counter()
        run = Generation(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop,
                         thinking_budget=args.thinking_budget, expert_threshold=args.expert_threshold,
                         tokenizer=tokenizer, prefill_chunk=args.prefill_chunk, mesh=mesh)
        prefilled = time.perf_counter()
        for (delta,) in run.stream(args.segment):
            piece = delta.text if tokenizer is not None else "".join(f" {t}" for t in delta.tokens)
            sys.stdout.write(piece)
            sys.stdout.flush()
        out = run.result()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    end = time.perf_counter()
    n = int(out.lengths[0])
    sys.stdout.write("\n")
    print(f"[{len(prompt)} prompt tokens in {prefilled - start:.2f}s; {n} new tokens in {end - prefilled:.2f}s "
          f"({n / max(end - prefilled, 1e-9):.1f} tok/s, first calls include compilation); "
          f"finish: {out.finish_reasons[0]}]", file=sys.stderr)
    if args.show_routing:
        counts = out.routing.prompt[0] + out.routing.generated[0]
        for layer, row in enumerate(counts):
            skipped = out.routing.skipped[0][layer]
            extra = f"  skipped {np.asarray(skipped).tolist()}" if args.expert_threshold else ""
            print(f"layer {layer:3d}: {np.asarray(row).tolist()}{extra}", file=sys.stderr)
    return 0
