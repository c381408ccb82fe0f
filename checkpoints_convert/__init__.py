"""Checkpoint conversion between Hugging Face safetensors and m1jax orbax checkpoints (`m1jax convert ...`)."""

from checkpoints_convert.hf_to_orbax import Totals, convert_hf_to_orbax, dry_run
from checkpoints_convert.orbax_checkpoint import (is_orbax_checkpoint, load_orbax_checkpoint, load_orbax_params,
                                                  read_config, save_orbax_checkpoint)
from checkpoints_convert.orbax_to_hf import convert_orbax_to_hf

__all__ = ["Totals", "convert_hf_to_orbax", "convert_orbax_to_hf", "dry_run", "is_orbax_checkpoint",
           "load_orbax_checkpoint", "load_orbax_params", "read_config", "save_orbax_checkpoint"]
