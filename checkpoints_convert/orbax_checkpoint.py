"""The m1jax orbax checkpoint: the ModelConfig next to an orbax PyTree of the parameters, written streamed.

    CKPT_DIR/
      m1jax_config.json   ModelConfig.to_dict(): the checkpoint describes itself
      hf_config.json      the source config.json when converted from Hugging Face (orbax-to-hf writes it back)
      params/             an orbax checkpoint of the parameter tree (cycle positions stored as "0", "1", ...)

Orbax writes `params/` itself (its metadata, with a one-element stand-in array per parameter); then each
parameter's zarr2 array is given its full shape and its chunk files are written directly, slab by slab, on a
background thread (zarr_chunks). That is the format orbax writes without OCDBT (whose writer keeps a whole array
in memory) and without compression (weights do not compress; zstd costs throughput), and orbax restores it as its
own; but no writer holds a whole parameter, and there is no orbax save per parameter (~35 ms each, plus an fsync
per chunk file: the staging directory is synced once, at the end). Chunks split the leading axes only (per
cycle, experts per (cycle, expert)), so that a sharded restore reads only its own chunks.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from checkpoints_convert.background_writer import BackgroundWriter
from checkpoints_convert.staging import staged_directory
from checkpoints_convert.zarr_chunks import ZARRAY, ChunkedArray, ChunkLayout
from m1jax.config import ModelConfig
from m1jax.weights import (ROUTER, CheckpointError, ParamPath, ParamSpec, Piece, get_path, iter_mapped, param_specs,
                           set_path)

CONFIG_FILE = "m1jax_config.json"
HF_CONFIG_FILE = "hf_config.json"
PARAMS_DIR = "params"


_MIN_CHUNK = 16 * 2**20  # split along cycles (and experts) only while the blocks stay at least this big


def chunk_split(path: ParamPath, shape: tuple[int, ...], itemsize: int) -> int:
    """How many leading axes the storage chunks split: 2 (per cycle and expert) for expert weights, 1 (per
    cycle) for other stacked matrices, as far as the chunks stay >= 16 MiB (many small files write slowly);
    else 0 (one chunk). A sharded restore then reads only its own chunks along the layer and expert axes."""
    if path[0] != "cycles" or len(shape) < 3:
        return 0
    nbytes = math.prod(shape) * itemsize
    for n in ((2,) if path[-1] in ("w1", "w2", "w3") else ()) + (1,):
        if nbytes // math.prod(shape[:n]) >= _MIN_CHUNK:
            return n
    return 0


def _save_context() -> ocp.Context:
    ctx = ocp.Context()
    ctx.array.saving.use_ocdbt = False
    ctx.array.saving.use_compression = False
    ctx.array.saving.use_zarr3 = False
    return ctx


def _to_orbax(tree):
    """Orbax wants string keys: cycle positions become "0", "1", ..."""
    return {str(k): _to_orbax(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _from_orbax(tree):
    if not isinstance(tree, Mapping):
        return tree
    return {int(k) if k.isdigit() else k: _from_orbax(v) for k, v in tree.items()}


def _array_dir(params_dir: Path, path: ParamPath) -> Path:
    """Where orbax keeps a parameter's zarr2 array without OCDBT: `params/<item>/<keys joined by dots>`."""
    name = ".".join(map(str, path))
    found = [d for d in params_dir.glob(f"*/{glob.escape(name)}") if (d / ZARRAY).is_file()]
    if len(found) != 1:
        raise CheckpointError(f"{params_dir}: expected one zarr2 array directory */{name} for parameter "
                              f"{'/'.join(map(str, path))}, found {len(found)} (not written by m1jax?)")
    return found[0]


class ParamWriter(BackgroundWriter):
    """Writes the parameters `params` (path -> (shape, dtype)) of an m1jax checkpoint into `directory/params`.

    Orbax saves the checkpoint with stand-ins first; then `array(path)` gives each parameter's full-size
    ChunkedArray to write (`write`, `write_block`) on the background thread. Closing (the end of the `with`)
    waits for the writes and checks that every parameter was written completely.
    """

    def __init__(self, directory: Path, params: Mapping[ParamPath, tuple[tuple[int, ...], np.dtype]]):
        self.path = Path(directory) / PARAMS_DIR
        self._params = dict(params)
        self._arrays: dict[ParamPath, ChunkedArray] = {}
        standins: dict = {}
        for path, (shape, dtype) in self._params.items():
            set_path(standins, path, np.zeros((1,) * len(shape), dtype))
        absl = logging.getLogger("absl")
        absl.addFilter(_no_ocdbt_merge_warning)
        try:
            with _save_context():
                ocp.save(self.path, _to_orbax(standins))
        finally:
            absl.removeFilter(_no_ocdbt_merge_warning)
        super().__init__()

    def array(self, path: ParamPath) -> ChunkedArray:
        """The parameter's zarr array at full size (set up on first call), to write at byte offsets."""
        if path not in self._arrays:
            shape, dtype = self._params[path]
            layout = ChunkLayout.rewrite(_array_dir(self.path, path), shape,
                                         chunk_split(path, shape, np.dtype(dtype).itemsize))
            self._arrays[path] = ChunkedArray(layout)
        return self._arrays[path]

    def close(self) -> None:
        """Wait for the writes, then check that every parameter was written in full."""
        super().close()
        unwritten = [path for path in self._params if path not in self._arrays or self._arrays[path].missing]
        if unwritten:
            raise CheckpointError(f"{self.path}: {len(unwritten)} parameter(s) not written completely, e.g. "
                                  + "/".join(map(str, unwritten[0])))


def _no_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """orbax always tries to merge OCDBT files and warns that there are none: expected here, since we skip OCDBT."""
    return "Skipping merge of OCDBT" not in record.getMessage()


def write_config(directory: Path, config: ModelConfig, hf_config: dict | None = None) -> None:
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if hf_config is not None:
        (Path(directory) / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


def save_orbax_checkpoint(directory: str | Path, params: Mapping, config: ModelConfig, *,
                          hf_config: dict | None = None, overwrite: bool = False) -> None:
    """Write an in-memory parameter tree (numpy or jax arrays) as an m1jax orbax checkpoint."""
    arrays = {spec.path: get_path(params, spec.path) for spec in param_specs(config)}
    with staged_directory(directory, overwrite) as stage:
        with ParamWriter(stage, {p: (tuple(a.shape), np.dtype(a.dtype)) for p, a in arrays.items()}) as writer:
            for path, array in arrays.items():
                writer.write(writer.array(path), 0, np.ascontiguousarray(array).reshape(-1).view(np.uint8))
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


def iter_stored_blocks(path: str | Path, specs: list[ParamSpec]) -> Iterator[tuple[ParamSpec, Piece, np.ndarray]]:
    """(spec, piece, the piece's block of the stored parameter) for every piece of `specs`, in order: each block
    a view of a memory map of its chunk file, valid until the next item (iter_mapped: read ahead, one block in
    RSS at a time)."""
    params_dir = _require(Path(path)) / PARAMS_DIR
    layouts = {spec.path: ChunkLayout.read(_array_dir(params_dir, spec.path)) for spec in specs}
    items = [(spec, piece) for spec in specs for piece in spec.pieces]
    blocks = iter_mapped([layouts[spec.path].block(piece.index) for spec, piece in items])
    for (spec, piece), block in zip(items, blocks):
        yield spec, piece, block
