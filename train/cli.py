"""`m1jax train`: train from a config file, or prepare a token directory.

    m1jax train --config train/configs/tiny.yaml [section.key=value ...]
    m1jax train rl --config train/configs/arithmetic_rl.yaml [section.key=value ...]   (CISPO from rewards)
    m1jax train prepare corpus.jsonl --tokenizer tokenizer.json --out data/corpus
    m1jax train recipe arithmetic [--out DIR] [--install]     (the default model's recipe)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["prepare"]:
        from train.data import main as prepare_main
        return prepare_main(argv[1:])
    if argv[:1] == ["recipe"]:
        from train.recipes import main as recipe_main
        return recipe_main(argv[1:])
    rl = argv[:1] == ["rl"]
    if rl:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="m1jax train rl" if rl else "m1jax train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML/JSON training config (see train/configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value changes, e.g. run.steps=100")
    args = parser.parse_args(argv)

    from train.config import TrainConfig, TrainConfigError
    from train.data import DataError
    from train.loop import NonFiniteLossError, train

    if rl:
        from train.rl import train_rl as train
    try:
        result = train(TrainConfig.load(args.config, args.overrides))
    except (TrainConfigError, DataError, NonFiniteLossError) as e:
        print(f"m1jax train: error: {e}", file=sys.stderr)
        return 1
    print(f"m1jax train: step {result.step}" + (" (stopped by signal)" if result.exit_code else ""),
          file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
