"""`from_pretrained`: a preset, a Hugging Face safetensors directory, or an orbax checkpoint -> M1Model;
`save_pretrained`: a (small) model -> a Hugging Face safetensors directory."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from m1jax.config import ModelConfig, get_preset
from m1jax.model import M1Model, abstract_model, init_model, params_of, with_params
from m1jax.sharding import param_shardings

PRESET_PREFIX = "preset:"


def from_pretrained(source: str | Path | None = None, *, dtype: str | None = None, mesh=None, seed: int = 0,
                    **config_overrides) -> M1Model:
    """Load a model.

    `source` is `preset:NAME` (a seeded random model of that preset), a Hugging Face-format directory
    (config.json + safetensors, either tensor-name layout), an orbax checkpoint written by
    `m1jax convert hf-to-orbax` or by training, or None for the embedded default model.
    With `mesh`, every parameter is placed straight into its sharding (see m1jax.sharding).
    """
    if source is None:
        from m1jax.default_model import default_model_path
        source = default_model_path()
    source = str(source)
    if source.startswith(PRESET_PREFIX):
        config = _with(get_preset(source[len(PRESET_PREFIX):]), dtype, config_overrides)
        model = init_model(config, seed)
        return model if mesh is None else shard_model(model, mesh)

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"from_pretrained: {path} does not exist (expected a directory or 'preset:NAME')")
    from checkpoints_convert import is_orbax_checkpoint, load_orbax_checkpoint
    from m1jax.weights import load_hf_checkpoint

    if is_orbax_checkpoint(path):
        config, restore = load_orbax_checkpoint(path)
    else:
        config, restore = ModelConfig.from_hf(path), lambda cfg, shardings: load_hf_checkpoint(
            path, cfg, dtype=cfg.dtype, shardings=shardings)
    config = _with(config, dtype, config_overrides)
    model = abstract_model(config)
    shardings = None if mesh is None else param_shardings(config, mesh)
    return with_params(model, restore(config, shardings))


def save_pretrained(model: M1Model, directory: str | Path, *, tokenizer=None, storage_dtype: str | None = None
                    ) -> Path:
    """config.json + model.safetensors (the original HF tensor names) [+ the tokenizer] in `directory`, which
    `from_pretrained` and transformers read. One file gathered on the host: for small models (the full M1 goes
    through `m1jax convert orbax-to-hf`). `storage_dtype` (e.g. "bfloat16") stores the weights in that dtype,
    except the router (fp32 in M1); config.json keeps the model's dtype, so loading casts back."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from m1jax.weights import iter_hf_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored = None if storage_dtype is None else np.dtype(getattr(ml_dtypes, storage_dtype, storage_dtype))
    params = jax.tree.map(np.asarray, params_of(model))
    tensors = {name: t if stored is None or name.endswith("block_sparse_moe.gate.weight") else t.astype(stored)
               for name, t in iter_hf_tensors(params, model.config)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
    (directory / "config.json").write_text(json.dumps(model.config.to_hf(), indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _with(config: ModelConfig, dtype: str | None, overrides: dict) -> ModelConfig:
    return config.replace(**({"dtype": dtype} if dtype else {}), **overrides)


def shard_model(model: M1Model, mesh) -> M1Model:
    """Place an in-memory model's parameters into their shardings on `mesh`."""
    shardings = param_shardings(model.config, mesh)
    return with_params(model, jax.tree.map(jax.device_put, params_of(model), shardings))
