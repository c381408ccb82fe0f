"""m1jax: MiniMax-M1 (and MiniMax-Text-01) in JAX/Flax."""

from m1jax.config import PRESETS, ConfigError, ModelConfig, get_preset
from m1jax.loading import from_pretrained, save_pretrained
from m1jax.generation import generate
from m1jax.model import M1Model, Output, abstract_params, forward, init_model, parameter_counts
from m1jax.sharding import make_mesh

__all__ = ["ConfigError", "M1Model", "ModelConfig", "Output", "PRESETS", "abstract_params", "forward",
           "from_pretrained", "generate", "get_preset", "init_model", "make_mesh", "parameter_counts",
           "save_pretrained"]
