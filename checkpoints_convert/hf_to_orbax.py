"""`m1jax convert hf-to-orbax`: a Hugging Face safetensors checkpoint -> an m1jax orbax checkpoint, streamed.

Tensors are read one at a time through the index (memory-mapped), stacked per parameter (experts per layer,
layers per cycle) and each finished parameter is saved at once, so peak host memory is the largest stacked
parameter plus a tensor or two, whatever the checkpoint's size. `dst` appears only when the conversion is complete.
"""

from __future__ import annotations

import argparse
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
from m1jax.weights import (INDEX_FILE, CheckpointError, check_checkpoint, check_names, hf_tensor_specs,
                           is_ignored, iter_params, read_index, scan_checkpoint)


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


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4}."""
    mesh = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"expected AXIS=SIZE[,AXIS=SIZE...], got {text!r}")
        mesh[name.strip()] = int(size)
    return mesh


def check_mesh(config: ModelConfig, mesh: Mapping[str, int]) -> str:
    """Check the checkpoint can be restored on `mesh` (experts split evenly); return a one-line description.

    The storage chunks (one per cycle and expert) lie inside every expert shard, whatever the mesh.
    """
    experts = mesh.get("expert", 1)
    if config.num_experts % experts:
        raise ConfigError(f"mesh expert={experts} does not divide num_experts={config.num_experts}")
    axes = " ".join(f"{k}={v}" for k, v in mesh.items())
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
    model_tensors = [t for n, t in tensors.items() if not is_ignored(n)]
    total = sum(t.nbytes for t in model_tensors)
    start = time.perf_counter()
    with staged_directory(dst, overwrite) as stage, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="hf-to-orbax",
                 disable=not progress) as bar:
        done = [0]

        def on_tensor(t):
            done[0] += 1
            bar.set_postfix_str(f"{done[0]}/{len(model_tensors)} tensors", refresh=False)
            bar.update(t.nbytes)

        writer = ParamWriter(stage)
        router = set()
        for spec, array in iter_params(tensors, specs, dtype=config.dtype, router_dtype=router_dtype,
                                       on_tensor=on_tensor):
            if spec.is_router:
                router.add(str(array.dtype))
            writer.add(spec.path, array)
            del array  # free this parameter before the next one is assembled
        writer.finish()
        write_config(stage, config, json.loads((src / "config.json").read_text()))
    return Totals(len(model_tensors), len({t.file for t in model_tensors}), total,
                  sum(math.prod(t.shape) for t in model_tensors), layout, "/".join(sorted(router)),
                  time.perf_counter() - start)


def dry_run(src: str | Path) -> Totals:
    """Check config.json and the index alone (shard headers too, when the shards are present); raise one
    CheckpointError listing every problem, else return the totals."""
    src = Path(src)
    config = ModelConfig.from_hf(src)
    index_path = src / INDEX_FILE
    if not index_path.exists() or all((src / f).exists() for f in set(read_index(index_path)["weight_map"].values())):
        tensors = scan_checkpoint(src)
        layout, _ = check_checkpoint(tensors, config, src)
        model = {n: t for n, t in tensors.items() if not is_ignored(n)}
        routers = {str(t.dtype) for n, t in model.items() if n.endswith(("moe.gate.weight", "mlp.gate.weight"))}
        return Totals(len(model), len({t.file for t in model.values()}), sum(t.nbytes for t in model.values()),
                      sum(math.prod(t.shape) for t in model.values()), layout, "/".join(sorted(routers)))

    index = read_index(index_path)
    weight_map = index["weight_map"]
    layout, problems = check_names(weight_map, config)
    specs = hf_tensor_specs(config, layout)
    itemsize = np.dtype(config.dtype).itemsize
    numels = {n: math.prod(shape) for n, (shape, _) in specs.items()}
    routers = [n for n in specs if n.endswith(("moe.gate.weight", "mlp.gate.weight"))]
    by_router = {"float32": sum(numels.values()) * itemsize + sum(numels[n] for n in routers) * (4 - itemsize),
                 config.dtype: sum(numels.values()) * itemsize}
    stated = index.get("metadata", {}).get("total_size")
    has_buffers = any(is_ignored(n) for n in weight_map)
    router_dtype = "float32"
    if stated is not None and not has_buffers:
        matches = [dt for dt, size in by_router.items() if size == stated]
        if matches:
            router_dtype = matches[0]
        else:
            problems.append(f"total_size: the index says {stated:,} bytes; the config gives "
                            + " or ".join(f"{size:,} (router {dt})" for dt, size in by_router.items()))
    if problems:
        raise CheckpointError(f"{index_path}: {len(problems)} problem(s) for a {layout}-layout checkpoint:\n  "
                              + "\n  ".join(problems))
    files = {weight_map[n] for n in specs}
    return Totals(len(specs), len(files), by_router[router_dtype], sum(numels.values()), layout, router_dtype)
