"""`m1jax info`: a config's layer pattern and parameter counts, computed from abstract shapes."""

import argparse

from m1jax.config import PRESETS, ModelConfig, get_preset
from m1jax.model import parameter_counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m1jax info", description=__doc__)
    parser.add_argument("config", help=f"a preset ({', '.join(PRESETS)}) or a path to config.json")
    args = parser.parse_args(argv)
    config = get_preset(args.config) if args.config in PRESETS else ModelConfig.from_hf(args.config)
    counts = parameter_counts(config)
    print(f"layers {config.num_layers} = {config.num_cycles} x {''.join(t[0].upper() for t in config.cycle)} "
          f"(L = lightning, S = softmax); hidden {config.hidden_size}; {config.num_heads} heads x {config.head_dim}; "
          f"{config.num_experts} experts top-{config.num_experts_per_tok} x {config.intermediate_size}")
    for name, n in counts.items():
        print(f"{name:>10}: {n / 1e9:9.3f} B")
    return 0
