"""The `m1jax` command. Each subcommand lives with the code it drives and exposes `main(argv)`."""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "generate": ("infer.cli", "generate text with a model (default: the embedded demo model)"),
    "serve": ("infer.server", "serve a model over HTTP (OpenAI-compatible + /v1/minimax-m1/generate)"),
    "train": ("train.cli", "train or fine-tune a model from a config file"),
    "convert": ("checkpoints_convert.cli", "convert checkpoints between HF safetensors and orbax"),
    "plan": ("m1jax.plan", "per-device memory plan of a config on a mesh, without allocating"),
    "info": ("m1jax.info", "print a config's shape and parameter counts"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS))
        lines = [f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items()]
        print("usage: m1jax <command> [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] in ("convert", "plan", "info"):  # host-only work: keep jax off the accelerator
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
