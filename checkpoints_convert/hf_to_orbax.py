"""`m1jax convert hf-to-orbax`: a Hugging Face safetensors checkpoint -> an m1jax orbax checkpoint, streamed.

Tensors are read one at a time through the index (memory-mapped, the kernel reading ahead), transposed slab by
slab into a few small buffers and each slab written straight to its place in the stacked parameter's chunk files
(experts per layer, layers per cycle) on a background thread, so that copying and writing overlap and peak host
memory is a tensor plus the buffers, whatever the checkpoint's size. `dst` appears only when the conversion is
complete (and synced to disk).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoints_convert.orbax_checkpoint import ParamWriter, write_config
from checkpoints_convert.staging import check_destination, staged_directory
from m1jax.config import ConfigError, ModelConfig
from m1jax.sharding import AXES, validate
from m1jax.weights import (INDEX_FILE, ROUTER_SUFFIXES, CheckpointError, ParamSpec, Piece, check_checkpoint,
                           check_names, hf_tensor_specs, is_ignored, iter_pieces, param_dtype, read_index,
                           scan_checkpoint)


@dataclasses.dataclass(frozen=True)
class Totals:
    """What a checkpoint holds (model tensors only: ignored buffers are not counted)."""

    tensors: int
    files: int
    bytes: int
    parameters: int
    layout: str
    router_dtype: str
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = f", {self.bytes / 1e6 / self.seconds:,.0f} MB/s in {self.seconds:.1f} s" if self.seconds else ""
        return (f"{self.tensors:,} tensors in {self.files:,} files, {self.bytes:,} bytes, "
                f"{self.parameters:,} parameters ({self.layout} layout, router {self.router_dtype}){rate}")


def check_mesh(config: ModelConfig, mesh: Mapping[str, int]) -> str:
    """Check that the checkpoint can be restored on `mesh` (m1jax.sharding's rules); describe the split.

    The storage chunks (one per cycle, and per expert for expert weights) lie inside every layer and expert
    shard, so a sharded restore reads only its own chunks along those axes.
    """
    unknown = sorted(set(mesh) - set(AXES))
    if unknown:
        raise ConfigError(f"mesh axes {unknown} are not among m1jax's {AXES}")
    if any(size < 1 for size in mesh.values()):
        raise ConfigError(f"mesh sizes must be >= 1, got {dict(mesh)}")
    validate(config, mesh)
    axes = " ".join(f"{k}={v}" for k, v in mesh.items())
    experts = mesh.get("expert", 1)
    return f"mesh {axes}: {config.num_experts} experts, {config.num_experts // experts} per expert shard"


def convert_hf_to_orbax(src: str | Path, dst: str | Path, *, dtype: str | None = None,
                        router_dtype: str | None = None, mesh: Mapping[str, int] | None = None,
                        overwrite: bool = False, progress: bool = True) -> Totals:
    """Convert; `dtype` defaults to the config's, the router keeps its stored dtype unless `router_dtype`."""
    src = Path(src)
    config = ModelConfig.from_hf(src)
    if dtype:
        config = config.replace(dtype=dtype)
    if mesh:
        check_mesh(config, mesh)
    tensors = scan_checkpoint(src)
    layout, specs = check_checkpoint(tensors, config, src)
    check_destination(dst, overwrite)
    dtypes = {s.path: param_dtype(s, tensors, config.dtype, router_dtype) for s in specs}
    model_tensors = [t for n, t in tensors.items() if not is_ignored(n)]
    total = sum(t.nbytes for t in model_tensors)
    start = time.perf_counter()
    with staged_directory(dst, overwrite) as stage, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="hf-to-orbax",
                 disable=not progress) as bar:
        done: set[str] = set()
        with ParamWriter(stage, {s.path: (s.shape, dtypes[s.path]) for s in specs}) as writer:
            for spec, piece, tensor, block in iter_pieces(tensors, specs):
                dt = dtypes[spec.path]
                writer.write_block(writer.array(spec.path), block_offset(spec, piece, dt), block, spec.transposed, dt)
                done.add(tensor.name)
                bar.set_postfix_str(f"{len(done)}/{len(model_tensors)} tensors", refresh=False)
                bar.update(block.size * tensor.dtype.itemsize)
        write_config(stage, config, json.loads((src / "config.json").read_text()))
    router = {str(dtypes[s.path]) for s in specs if s.is_router}
    return Totals(len(model_tensors), len({t.file for t in model_tensors}), total,
                  sum(math.prod(t.shape) for t in model_tensors), layout, "/".join(sorted(router)),
                  time.perf_counter() - start)


def block_offset(spec: ParamSpec, piece: Piece, dtype: np.dtype) -> int:
    """Byte offset of the piece's block (param[piece.index]) in the parameter's C-order bytes."""
    lead = spec.shape[:len(piece.index)]
    return int(np.ravel_multi_index(piece.index, lead)) * math.prod(spec.shape[len(lead):]) * dtype.itemsize \
        if lead else 0


def dry_run(src: str | Path) -> Totals:
    """Check config.json and the index alone, or the shard headers too when the shards are present; raise one
    CheckpointError listing every problem, else return the totals. Reads no tensor data."""
    src = Path(src)
    config = ModelConfig.from_hf(src)
    index_path = src / INDEX_FILE
    if index_path.exists():
        index = read_index(index_path)
        if not all((src / f).exists() for f in set(index["weight_map"].values())):
            return _check_index(index, config, f"{index_path} does not match {src / 'config.json'}")
    tensors = scan_checkpoint(src)
    layout, _ = check_checkpoint(tensors, config, src)
    model = [t for n, t in tensors.items() if not is_ignored(n)]
    routers = {str(t.dtype) for t in model if t.name.endswith(ROUTER_SUFFIXES)}
    return Totals(len(model), len({t.file for t in model}), sum(t.nbytes for t in model),
                  sum(math.prod(t.shape) for t in model), layout, "/".join(sorted(routers)))


def _check_index(index: dict, config: ModelConfig, where: str) -> Totals:
    """Names from the index, shapes from the config, and total_size against both router dtypes."""
    weight_map = index["weight_map"]
    layout, problems = check_names(weight_map, config)
    specs = hf_tensor_specs(config, layout)
    itemsize = np.dtype(config.dtype).itemsize
    numel = {n: math.prod(shape) for n, (shape, _) in specs.items()}
    router_numel = sum(v for n, v in numel.items() if n.endswith(ROUTER_SUFFIXES))
    by_router = {"float32": sum(numel.values()) * itemsize + router_numel * (4 - itemsize),
                 config.dtype: sum(numel.values()) * itemsize}
    router_dtype, stated = "float32", index.get("metadata", {}).get("total_size")
    if stated is not None and not any(is_ignored(n) for n in weight_map):  # buffers would count in total_size
        matches = [dt for dt, size in by_router.items() if size == stated]
        if matches:
            router_dtype = matches[0]
        else:
            problems.append(f"total_size: the index says {stated:,} bytes; the config gives "
                            + " or ".join(f"{size:,} (router {dt})" for dt, size in by_router.items()))
    if problems:
        raise CheckpointError(f"{where} ({layout} tensor names), {len(problems)} problem(s):\n  "
                              + "\n  ".join(problems))
    return Totals(len(specs), len({weight_map[n] for n in specs}), by_router[router_dtype], sum(numel.values()),
                  layout, router_dtype)
