"""The m1jax orbax checkpoint: the ModelConfig next to an orbax PyTree of the parameters, written in pieces.

    CKPT_DIR/
      m1jax_config.json   ModelConfig.to_dict(): the checkpoint describes itself
      hf_config.json      the source config.json when converted from Hugging Face (orbax-to-hf writes it back)
      params/             an orbax checkpoint of the parameter tree (cycle positions stored as "0", "1", ...)

Parameters are written in groups no bigger than the largest parameter, each group one orbax partial save
(orbax.checkpoint v1 `partial.save`; `partial.finalize` commits them as one checkpoint), so a writer holds at most
one parameter's worth of arrays. Arrays are zarr2, uncompressed (weights do not compress; zstd costs throughput),
without OCDBT (its writer keeps a whole array in memory while writing it); big stacked parameters are chunked per
cycle, experts per (cycle, expert), so that a sharded restore reads only its own chunks.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp
from orbax.checkpoint.experimental.v1 import partial

from checkpoints_convert.staging import staged_directory
from m1jax.config import ModelConfig
from m1jax.weights import ROUTER, CheckpointError, ParamPath, get_path, param_specs, set_path

CONFIG_FILE = "m1jax_config.json"
HF_CONFIG_FILE = "hf_config.json"
PARAMS_DIR = "params"


_MIN_CHUNK = 16 * 2**20  # split along cycles (and experts) only while the blocks stay at least this big


def _storage_options(keypath, value):
    """Storage chunks split the leading axes only, so each chunk is contiguous in the array (tensorstore writes it
    without a copy): per (cycle, expert) for expert weights, per cycle for other stacked matrices, as far as the
    blocks stay >= 16 MiB (many small chunk files write slowly). A sharded restore then reads only its own chunks
    along the layer and expert axes."""
    keys = [getattr(k, "key", k) for k in keypath]
    split = 0  # how many leading axes to split
    if keys[0] == "cycles" and np.ndim(value) >= 3:
        for n in ((2,) if keys[-1] in ("w1", "w2", "w3") else ()) + (1,):
            if value.nbytes // math.prod(value.shape[:n]) >= _MIN_CHUNK:
                split = n
                break
    return ocp.options.ArrayOptions.Saving.StorageOptions(shard_axes=tuple(range(split)))


def _save_context() -> ocp.Context:
    ctx = ocp.Context()
    ctx.array.saving.use_ocdbt = False
    ctx.array.saving.use_compression = False
    ctx.array.saving.use_zarr3 = False
    ctx.array.saving.scoped_storage_options_creator = _storage_options
    ctx.memory_options.deepcopy_host_arrays = False  # every save below completes before its array is touched again
    return ctx


def _to_orbax(tree):
    """Orbax wants string keys: cycle positions become "0", "1", ..."""
    return {str(k): _to_orbax(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _from_orbax(tree):
    if not isinstance(tree, Mapping):
        return tree
    return {int(k) if k.isdigit() else k: _from_orbax(v) for k, v in tree.items()}


def _return_freed_memory_to_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB. By default it rises to 32 MiB after big buffers are freed, and
    tensorstore's write threads then leave every freed chunk buffer in their arenas: RSS grew by one chunk per
    save, to 2.5x the largest parameter in benchmarks/convert.py. No-op off glibc."""
    try:
        ctypes.CDLL(None).mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
    except (AttributeError, OSError):
        pass


class ParamWriter:
    """Save groups of finished parameters into `directory/params`, one orbax partial save per group;
    `finish` commits them all as one orbax checkpoint."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / PARAMS_DIR
        self._ctx = _save_context()
        _return_freed_memory_to_os()

    def save(self, params: Mapping) -> None:
        """Write a (partial) parameter tree now; its arrays may be reused or freed when this returns."""
        with self._ctx:
            partial.save(self.path, _to_orbax(params))

    def finish(self) -> None:
        absl = logging.getLogger("absl")
        absl.addFilter(_no_ocdbt_merge_warning)
        try:
            with self._ctx:
                partial.finalize(self.path)
        finally:
            absl.removeFilter(_no_ocdbt_merge_warning)


def _no_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """finalize always tries to merge OCDBT files and warns that there are none: expected here, since we skip OCDBT."""
    return "Skipping merge of OCDBT" not in record.getMessage()


def write_config(directory: Path, config: ModelConfig, hf_config: dict | None = None) -> None:
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if hf_config is not None:
        (Path(directory) / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


def save_orbax_checkpoint(directory: str | Path, params: Mapping, config: ModelConfig, *,
                          hf_config: dict | None = None, overwrite: bool = False) -> None:
    """Write an in-memory parameter tree (numpy or jax arrays) as an m1jax orbax checkpoint."""
    with staged_directory(directory, overwrite) as stage:
        writer = ParamWriter(stage)
        tree: dict = {}
        for spec in param_specs(config):
            set_path(tree, spec.path, get_path(params, spec.path))
        writer.save(tree)
        writer.finish()
        write_config(stage, config, hf_config)


# ---- reading ------------------------------------------------------------------------------------
def is_orbax_checkpoint(path: str | Path) -> bool:
    """True for a complete m1jax orbax checkpoint directory (an interrupted conversion never is)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and ocp.is_orbax_checkpoint(path / PARAMS_DIR)


def _require(path: Path) -> Path:
    if not is_orbax_checkpoint(path):
        raise CheckpointError(f"{path}: not a complete m1jax orbax checkpoint "
                              f"(expected {CONFIG_FILE} and a committed {PARAMS_DIR}/ orbax checkpoint)")
    return path


def read_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((_require(Path(path)) / CONFIG_FILE).read_text()))


def read_hf_config(path: str | Path) -> dict | None:
    file = Path(path) / HF_CONFIG_FILE
    return json.loads(file.read_text()) if file.exists() else None


def _metadata(path: Path) -> dict[ParamPath, object]:
    """path -> orbax metadata leaf (shape, dtype) of every stored parameter; reads no array data."""
    meta = _from_orbax(ocp.metadata(_require(path) / PARAMS_DIR).metadata)
    leaves = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {tuple(getattr(k, "key", k) for k in kp): m for kp, m in leaves}


def stored_params(path: str | Path) -> dict[ParamPath, tuple[tuple[int, ...], np.dtype]]:
    """path -> (shape, dtype) of every stored parameter."""
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _metadata(Path(path)).items()}


def load_orbax_params(path: str | Path, target: Mapping) -> dict:
    """Restore the parameter tree straight into its shardings.

    `target` is the parameter tree (int cycle keys) with jax.ShapeDtypeStruct leaves (with .sharding; the
    dtype may differ from the stored one, orbax casts) or with jax.sharding.Sharding leaves (stored dtype).
    """
    path = _require(Path(path))
    stored = stored_params(path)
    problems, abstract = [], {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(target, is_leaf=_is_target_leaf)[0]:
        p = tuple(getattr(k, "key", k) for k in kp)
        if p not in stored:
            problems.append(f"missing: {'/'.join(map(str, p))}")
            continue
        shape, dtype = stored[p]
        if isinstance(leaf, jax.sharding.Sharding):
            leaf = jax.ShapeDtypeStruct(shape, dtype, sharding=leaf)
        elif tuple(leaf.shape) != shape:
            problems.append(f"shape: {'/'.join(map(str, p))} is stored as {list(shape)}, "
                            f"requested {list(leaf.shape)}")
        set_path(abstract, p, leaf)
    if problems:
        raise CheckpointError(f"{path}: the checkpoint does not match the requested parameters:\n  "
                              + "\n  ".join(problems))
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        return _from_orbax(ocp.load(path / PARAMS_DIR, _to_orbax(abstract)))


def _is_target_leaf(x) -> bool:
    return isinstance(x, (jax.ShapeDtypeStruct, jax.sharding.Sharding))


def load_orbax_checkpoint(path: str | Path) -> tuple[ModelConfig, Callable[[ModelConfig, Mapping | None], dict]]:
    """(stored config, restore) where restore(config, shardings) reads the parameters in config.dtype
    (the router in its stored dtype) into `shardings`, or onto the default device when it is None."""
    path = _require(Path(path))
    stored = stored_params(path)

    def restore(config: ModelConfig, shardings: Mapping | None) -> dict:
        target: dict = {}
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        for spec in param_specs(config):
            dtype = stored.get(spec.path, (None, spec.dtype))[1] if spec.path[-1] == ROUTER else config.dtype
            sharding = default if shardings is None else get_path(shardings, spec.path)
            set_path(target, spec.path, jax.ShapeDtypeStruct(spec.shape, dtype, sharding=sharding))
        return load_orbax_params(path, target)

    return read_config(path), restore


def param_reader(path: str | Path) -> Callable[[ParamPath], np.ndarray]:
    """A function reading one stored parameter as a host numpy array: what an exporter needs to stay bounded."""
    path = Path(path)
    meta = _metadata(path)
    _return_freed_memory_to_os()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True

    def read(p: ParamPath) -> np.ndarray:
        if p not in meta:
            raise CheckpointError(f"{path}: parameter {'/'.join(map(str, p))} is not stored")
        tree: dict = {}
        set_path(tree, p, meta[p])  # a numpy metadata leaf restores as a numpy array
        with ctx:
            return get_path(_from_orbax(ocp.load(path / PARAMS_DIR, _to_orbax(tree))), p)

    return read
