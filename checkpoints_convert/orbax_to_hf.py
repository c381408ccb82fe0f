"""`m1jax convert orbax-to-hf`: an m1jax orbax checkpoint -> safetensors shards in the original tensor names.

Writes `model-0000k-of-0000n.safetensors` shards of at most `max_shard_size` (a tensor larger than that gets a
shard of its own), `model.safetensors.index.json` and a `config.json` that both transformers' MiniMaxForCausalLM
and the original remote code read. The stored arrays are read chunk by chunk with tensorstore (the next chunk
while one is used), every shard's header is known in advance, and each tensor is transposed slab by slab into
small buffers written straight to its place in its shard on a background thread.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoints_convert.background_writer import BackgroundWriter, OutputFile
from checkpoints_convert.hf_to_orbax import Totals
from checkpoints_convert.orbax_checkpoint import iter_stored_blocks, read_config, read_hf_config, stored_params
from checkpoints_convert.staging import check_destination, staged_directory
from m1jax.config import ModelConfig
from m1jax.weights import INDEX_FILE, ROUTER_SUFFIXES, CheckpointError, param_specs, safetensors_dtype

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' (10^9, as transformers counts), '4GiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or 2GiB, got {text!r}")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"a shard size must be positive, got {text!r}")
    return size


def group_by_size(items: list, sizes: list[int], budget: int) -> list[list]:
    """Consecutive items in groups of at most `budget` bytes (an item larger than that alone)."""
    groups, total = [[]], 0
    for item, size in zip(items, sizes):
        if groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    return groups


def safetensors_header(entries) -> bytes:
    """A safetensors header for `entries` laid out back to back, padded to 8 bytes as the format asks."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": safetensors_dtype(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def export_hf_config(config: ModelConfig, source: dict | None) -> dict:
    """The source config.json when the checkpoint came from Hugging Face; otherwise the original keys plus
    transformers' names for the same fields. Either way with the checkpoint's dtype."""
    if source is None:
        kinds = {"lightning": "linear_attention", "softmax": "full_attention"}
        source = {**config.to_hf(), "model_type": "minimax", "architectures": ["MiniMaxForCausalLM"],
                  "layer_types": [kinds[t] for t in config.layer_types],
                  "linear_attn_alpha_factor": config.linear_attn_alpha,
                  "linear_attn_beta_factor": config.linear_attn_beta,
                  "full_attn_alpha_factor": config.full_attn_alpha, "full_attn_beta_factor": config.full_attn_beta,
                  "mlp_alpha_factor": config.mlp_alpha, "mlp_beta_factor": config.mlp_beta,
                  "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}
    keys = [k for k in ("torch_dtype", "dtype") if k in source] or ["torch_dtype"]
    return {**source, **{k: config.dtype for k in keys}}


def convert_orbax_to_hf(src: str | Path, dst: str | Path, *, max_shard_size: str | int = "5GB",
                        overwrite: bool = False, progress: bool = True) -> Totals:
    src = Path(src)
    max_bytes = parse_size(max_shard_size)
    config = read_config(src)
    stored = stored_params(src)
    entries, problems = [], []
    for spec in param_specs(config, "original"):
        shape, dtype = stored.get(spec.path, (None, None))
        if shape != spec.shape:
            problems.append(f"{'/'.join(map(str, spec.path))}: stored {shape}, config expects {list(spec.shape)}")
            continue
        entries += [(piece.name, piece.shape, dtype) for piece in spec.pieces]
    if problems:
        raise CheckpointError(f"{src}: parameters do not match its config:\n  " + "\n  ".join(problems))
    check_destination(dst, overwrite)
    shards = group_by_size(entries, [math.prod(shape) * np.dtype(dt).itemsize for _, shape, dt in entries], max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(math.prod(shape) * np.dtype(dt).itemsize for _, shape, dt in entries)
    start = time.perf_counter()
    blocks = iter_stored_blocks(src, param_specs(config, "original"))
    with staged_directory(dst, overwrite) as stage, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="orbax-to-hf",
                 disable=not progress) as bar:
        with BackgroundWriter() as writer:
            for file, shard in zip(names, shards):
                out = OutputFile(stage / file)
                header = safetensors_header(shard)
                writer.write(out, 0, np.frombuffer(header, np.uint8))
                offset = len(header)
                for name, _, dtype in shard:
                    spec, piece, block = next(blocks)
                    assert piece.name == name, (piece.name, name)  # the plan and the stream follow the same order
                    writer.write_block(out, offset, block, spec.transposed, dtype)
                    offset += block.nbytes
                    bar.update(block.nbytes)
                writer.call(out.close)
        weight_map = {name: file for file, shard in zip(names, shards) for name, _, _ in shard}
        (stage / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
        (stage / "config.json").write_text(json.dumps(export_hf_config(config, read_hf_config(src)), indent=2) + "\n")
    routers = {str(dt) for name, _, dt in entries if name.endswith(ROUTER_SUFFIXES)}
    return Totals(len(entries), len(shards), total, sum(math.prod(s) for _, s, _ in entries), "original",
                  "/".join(sorted(routers)), time.perf_counter() - start)
