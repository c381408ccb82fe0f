"""The default model shipped with m1jax: a small MiniMax-M1 (6 lightning + 2 softmax layers, 4 experts top-2,
2.2M parameters) that adds and subtracts integers of up to three digits, working column by column in a
<think> scratchpad before the answer. `m1jax.from_pretrained()` and `m1jax generate` without --model load it:

    m1jax generate --prompt "12+34=" --temperature 0

recipe.json records its task, training config and held-out accuracy. Regenerate it (about 10 CPU-minutes) with
`m1jax train recipe arithmetic --install` (train/recipes/arithmetic.py, train/configs/arithmetic.yaml).
"""

from pathlib import Path


def default_model_path() -> Path:
    """The directory holding the default model's config.json, model.safetensors and tokenizer.json."""
    path = Path(__file__).resolve().parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no default model; build it with `m1jax train recipe arithmetic "
                                f"--install`")
    return path
