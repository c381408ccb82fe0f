"""Hugging Face checkpoint tensors <-> M1Model parameters, for both tensor-name layouts, streamed.

Parameter tree (`nnx.to_pure_dict` of M1Model; JAX layout = the HF `[out, in]` weight transposed; every leaf under
`cycles` has a leading `[num_cycles]` axis; layer l = c * len(cycle) + j):

    embed_tokens [vocab, d]                      model.embed_tokens.weight
    cycles.layers.{j}.input_norm.weight [C, d]   model.layers.{l}.input_layernorm.weight
    cycles.layers.{j}.post_attention_norm.weight model.layers.{l}.post_attention_layernorm.weight
    cycles.layers.{j}.attn.{qkv_proj,output_gate,out_proj} [C, in, out], .norm [C, H*D]   (lightning)
    cycles.layers.{j}.attn.{q,k,v,o}_proj [C, in, out]                                    (softmax)
    cycles.layers.{j}.moe.router [C, d, E]       block_sparse_moe.gate.weight (transformers: mlp.gate.weight)
    cycles.layers.{j}.moe.w1, w3 [C, E, d, I]    block_sparse_moe.experts.{e}.w1/w3.weight
                                                 (transformers: mlp.experts.gate_up_proj [E, 2I, d], w1 rows first)
    cycles.layers.{j}.moe.w2 [C, E, I, d]        block_sparse_moe.experts.{e}.w2.weight (transformers: down_proj)
    final_norm.weight [d]                        model.norm.weight
    lm_head [d, vocab]                           lm_head.weight (absent when tie_word_embeddings)

Safetensors files are read one tensor at a time through memory maps (the header is parsed here, so bf16 needs
no framework) with the kernel reading ahead. `iter_params` transposes each tensor straight into a preallocated
buffer for its stacked parameter and hands the parameter on once complete (host memory: one stacked parameter
plus one tensor); a streaming writer takes `iter_pieces` and `row_slabs` instead and never holds a parameter.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np

from m1jax.config import ModelConfig

Layout = Literal["original", "transformers"]
LAYOUTS: tuple[Layout, ...] = ("original", "transformers")
ParamPath = tuple[str | int, ...]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Persistent buffers transformers' save_pretrained writes for lightning layers; the model recomputes them.
IGNORED_SUFFIXES = (".self_attn.slope_rate", ".self_attn.query_decay", ".self_attn.key_decay",
                    ".self_attn.diagonal_decay")
ROUTER = "router"
ROUTER_SUFFIXES = ("block_sparse_moe.gate.weight", "mlp.gate.weight")  # its HF names in the two layouts

# safetensors dtype name -> numpy dtype; None: valid in the format but not a weight dtype the model can take.
_ST_DTYPES: dict[str, np.dtype | None] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    **{name: None for name in ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E5M2", "F8_E4M3")},
}
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items() if v is not None}
_MAX_HEADER = 100 * 2**20
_READ_AHEAD = 256 * 2**20  # bytes of coming tensors the kernel is asked to read while one is copied
_TILE_BYTES = 32 * 2**10  # source bytes per step of a transposed copy: numpy's strided reads stay inside L1


class CheckpointError(ValueError):
    """A checkpoint that does not hold the tensors the config asks for, or a damaged file."""


# ---- reading safetensors ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype (None when not a weight dtype), shape and absolute byte range."""

    name: str
    file: Path
    dtype_name: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype(self) -> np.dtype | None:
        return _ST_DTYPES[self.dtype_name]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header against the file's size (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: header length {header_len} exceeds the file ({size} bytes); "
                                      "truncated or not a safetensors file")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base, data_len = 8 + header_len, size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if dtype_name not in _ST_ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r}")
        expected = math.prod(shape) * _ST_ITEMSIZE[dtype_name]
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} header says {end - begin} bytes at [{begin}, {end}) "
                                  f"but {dtype_name}{list(shape)} needs {expected}")
        if end > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data section but the file "
                                  f"holds only {data_len} data bytes (truncated file)")
        infos[name] = TensorInfo(name, path, dtype_name, shape, base + begin, base + end)
    return infos


def scan_checkpoint(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, through model.safetensors.index.json or a single model.safetensors."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.exists():
        if (directory / SINGLE_FILE).exists():
            return read_safetensors_header(directory / SINGLE_FILE)
        raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    weight_map = read_index(index_path)["weight_map"]
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    missing_files = sorted(f for f in by_file if not (directory / f).exists())
    if missing_files:
        raise CheckpointError(f"{index_path}: shard file(s) missing:\n  " + "\n  ".join(
            f"{f}, which should hold {', '.join(by_file[f])}" for f in missing_files))
    tensors, problems = {}, []
    for file, names in sorted(by_file.items()):
        header = read_safetensors_header(directory / file)
        for name in names:
            if name in header:
                tensors[name] = header[name]
            else:
                problems.append(f"{name}: listed in the index under {file}, which does not contain it")
    if problems:
        raise CheckpointError(f"{index_path} disagrees with the shard files:\n  " + "\n  ".join(problems))
    return tensors


def read_index(index_path: str | Path) -> dict[str, Any]:
    """A model.safetensors.index.json, checked for shape: {"metadata": {...}, "weight_map": {name: file}}."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{index_path}: no such file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    return index


# ---- the name <-> parameter mapping -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor (or a row range of it) that fills `param[index]`."""

    name: str
    shape: tuple[int, ...]  # the whole HF tensor
    index: tuple[int, ...] = ()  # (cycle,) or (cycle, expert): where the block goes in the stacked parameter
    rows: tuple[int, int] | None = None  # fused gate_up_proj: the row range (axis -2) this parameter takes


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its path, JAX shape and dtype, and the HF tensors it is assembled from."""

    path: ParamPath
    shape: tuple[int, ...]
    dtype: np.dtype
    transposed: bool  # each block is its HF tensor with the last two axes swapped
    pieces: tuple[Piece, ...]

    @property
    def is_router(self) -> bool:
        return self.path[-1] == ROUTER


def param_specs(config: ModelConfig, layout: Layout = "original") -> list[ParamSpec]:
    """Every parameter of `config`'s model, in a fixed order, with the HF tensors of `layout` it comes from."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dt, f32 = np.dtype(config.dtype), np.dtype(np.float32)
    d, v, E, I = config.hidden_size, config.vocab_size, config.num_experts, config.intermediate_size
    inner, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    period, C = len(config.cycle), config.num_cycles

    def stacked(path, block, names, hf_shape, *, transposed=True, dtype=dt, rows=None):
        """A [C, *block] parameter from one HF tensor per cycle (names: layer index -> tensor name)."""
        pieces = tuple(Piece(names(c * period + j), hf_shape, (c,), rows) for c in range(C))
        return ParamSpec(("cycles", "layers", j) + path, (C,) + block, dtype, transposed, pieces)

    specs = [ParamSpec(("embed_tokens",), (v, d), dt, False, (Piece("model.embed_tokens.weight", (v, d)),))]
    for j, kind in enumerate(config.cycle):
        layer = lambda suffix: lambda l: f"model.layers.{l}.{suffix}"
        specs += [stacked(("input_norm", "weight"), (d,), layer("input_layernorm.weight"), (d,), transposed=False),
                  stacked(("post_attention_norm", "weight"), (d,), layer("post_attention_layernorm.weight"), (d,),
                          transposed=False)]
        if kind == "lightning":
            specs += [stacked(("attn", "qkv_proj"), (d, 3 * inner), layer("self_attn.qkv_proj.weight"), (3 * inner, d)),
                      stacked(("attn", "output_gate"), (d, inner), layer("self_attn.output_gate.weight"), (inner, d)),
                      stacked(("attn", "out_proj"), (inner, d), layer("self_attn.out_proj.weight"), (d, inner)),
                      stacked(("attn", "norm"), (inner,), layer("self_attn.norm.weight"), (inner,), transposed=False)]
        else:
            specs += [stacked(("attn", "q_proj"), (d, inner), layer("self_attn.q_proj.weight"), (inner, d)),
                      stacked(("attn", "k_proj"), (d, kv), layer("self_attn.k_proj.weight"), (kv, d)),
                      stacked(("attn", "v_proj"), (d, kv), layer("self_attn.v_proj.weight"), (kv, d)),
                      stacked(("attn", "o_proj"), (inner, d), layer("self_attn.o_proj.weight"), (d, inner))]
        if layout == "original":
            moe = layer("block_sparse_moe")
            specs.append(stacked(("moe", ROUTER), (d, E), lambda l: f"{moe(l)}.gate.weight", (E, d), dtype=f32))
            for w, block, hf in (("w1", (d, I), (I, d)), ("w3", (d, I), (I, d)), ("w2", (I, d), (d, I))):
                pieces = tuple(Piece(f"{moe(c * period + j)}.experts.{e}.{w}.weight", hf, (c, e))
                               for c in range(C) for e in range(E))
                specs.append(ParamSpec(("cycles", "layers", j, "moe", w), (C, E) + block, dt, True, pieces))
        else:
            mlp = layer("mlp")
            gate_up = lambda l: f"{mlp(l)}.experts.gate_up_proj"
            specs += [stacked(("moe", ROUTER), (d, E), lambda l: f"{mlp(l)}.gate.weight", (E, d), dtype=f32),
                      stacked(("moe", "w1"), (E, d, I), gate_up, (E, 2 * I, d), rows=(0, I)),
                      stacked(("moe", "w3"), (E, d, I), gate_up, (E, 2 * I, d), rows=(I, 2 * I)),
                      stacked(("moe", "w2"), (E, I, d), lambda l: f"{mlp(l)}.experts.down_proj", (E, d, I))]
    specs.append(ParamSpec(("final_norm", "weight"), (d,), dt, False, (Piece("model.norm.weight", (d,)),)))
    if not config.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head",), (d, v), dt, True, (Piece("lm_head.weight", (v, d)),)))
    return specs


def hf_tensor_specs(config: ModelConfig, layout: Layout = "original") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every tensor a checkpoint of `config` holds (router float32, as M1 ships it)."""
    return {piece.name: (piece.shape, spec.dtype) for spec in param_specs(config, layout) for piece in spec.pieces}


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def detect_layout(names: Iterable[str]) -> Layout:
    """'transformers' when any fused expert tensor is present, else 'original'."""
    return "transformers" if any(".mlp.experts.gate_up_proj" in n or ".mlp.experts.down_proj" in n
                                 for n in names) else "original"


def check_names(name_to_file: Mapping[str, str], config: ModelConfig) -> tuple[Layout, list[str]]:
    """The layout and the problems (missing or unexpected tensors) of a checkpoint's tensor list."""
    present = {n: f for n, f in name_to_file.items() if not is_ignored(n)}
    layout = detect_layout(present)
    expected = hf_tensor_specs(config, layout)
    problems = [f"missing: {n} {list(shape)}" for n, (shape, _) in expected.items() if n not in present]
    problems += [f"unexpected: {n} (in {present[n]})" for n in sorted(present) if n not in expected]
    return layout, problems


def check_checkpoint(tensors: Mapping[str, TensorInfo], config: ModelConfig,
                     where: str | Path = "checkpoint") -> tuple[Layout, list[ParamSpec]]:
    """Check names, shapes and dtypes against `config`; raise one CheckpointError listing every problem."""
    layout, problems = check_names({n: t.file.name for n, t in tensors.items()}, config)
    expected = hf_tensor_specs(config, layout)
    for name, (shape, _) in expected.items():
        t = tensors.get(name)
        if t is None:
            continue
        if t.dtype is None:
            problems.append(f"dtype: {name} in {t.file.name} is {t.dtype_name}, not a float weight dtype")
        if t.shape != shape:
            problems.append(f"shape: {name} in {t.file.name} is {list(t.shape)}, config expects {list(shape)}")
    if problems:
        hint = "; config.json disagrees with the tensors" if sum(p.startswith("shape:") for p in problems) > 1 else ""
        raise CheckpointError(f"{where} does not match its config ({layout} tensor names), "
                              f"{len(problems)} problem(s){hint}:\n  " + "\n  ".join(problems))
    return layout, param_specs(config, layout)


# ---- streaming parameters out of a checkpoint ---------------------------------------------------
def iter_pieces(tensors: Mapping[str, TensorInfo],
                specs: list[ParamSpec]) -> Iterator[tuple[ParamSpec, Piece, TensorInfo, np.ndarray]]:
    """(spec, piece, stored tensor, source block) for every piece of every parameter, parameter by parameter,
    each parameter's pieces in file order (see iter_mapped). The source block is the HF tensor, or its row
    range for a fused tensor; it is valid until the next item."""
    order = [(spec, spec.pieces[i]) for spec in specs
             for i in sorted(range(len(spec.pieces)), key=lambda i: (tensors[spec.pieces[i].name].file,
                                                                     tensors[spec.pieces[i].name].start))]
    for (spec, piece), src in zip(order, iter_mapped([tensors[piece.name] for _, piece in order])):
        yield spec, piece, tensors[piece.name], src if piece.rows is None else src[..., piece.rows[0]:piece.rows[1], :]


def iter_mapped(tensors: list[TensorInfo]) -> Iterator[np.ndarray]:
    """Each tensor, in order, as a read-only array in a memory map of its own (in a map of the whole file, the
    kernel's fault-around would map pages of other tensors), valid until the next one: then its pages leave this
    process (they stay in the page cache), so RSS holds one tensor. The kernel reads up to _READ_AHEAD bytes of
    the coming tensors (at least the next one) in the background."""
    files: dict[Path, int] = {}
    maps: collections.deque[mmap.mmap | None] = collections.deque()  # of the coming tensors, read ahead
    ahead, upcoming = 0, 0  # their bytes; the next one to map
    try:
        for k, info in enumerate(tensors):
            while upcoming < len(tensors) and (upcoming <= k + 1 or ahead < _READ_AHEAD):
                coming = tensors[upcoming]
                if coming.file not in files:
                    files[coming.file] = os.open(coming.file, os.O_RDONLY | os.O_CLOEXEC)
                maps.append(_map_tensor(coming, files[coming.file]))
                ahead, upcoming = ahead + coming.nbytes, upcoming + 1
            mapped = maps.popleft()
            yield (np.empty(0, info.dtype) if mapped is None else np.frombuffer(
                mapped, info.dtype, math.prod(info.shape), info.start % mmap.ALLOCATIONGRANULARITY)).reshape(info.shape)
            if mapped is not None:
                mapped.madvise(mmap.MADV_DONTNEED)
            ahead -= info.nbytes
    finally:
        for fd in files.values():  # the maps stay valid without them
            os.close(fd)


def _map_tensor(info: TensorInfo, fd: int) -> mmap.mmap | None:
    """A read-only map of the tensor's bytes (from the page boundary before them); the kernel starts reading."""
    if not info.nbytes:
        return None
    base = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fd, info.end - base, offset=base, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_WILLNEED)
    return mapped


def row_slabs(src: np.ndarray, transposed: bool, max_items: int) -> Iterator[tuple[int, np.ndarray]]:
    """Cut the block that `src` gives (src with its last two axes swapped when `transposed`) into slabs of
    consecutive whole rows (a vector: of elements) of at most `max_items` elements, or one row where a row is
    longer: (the slab's first element in the block, in C order; the part of `src` that copy_block copies there)."""
    if src.ndim < 2:
        for i in range(0, src.size, max_items):
            yield i, src[i:i + max_items]
        return
    rows, cols = src.shape[-2:][::-1] if transposed else src.shape[-2:]
    step = max(1, max_items // max(cols, 1))
    for n, lead in enumerate(np.ndindex(src.shape[:-2])):
        matrix = src[lead]
        for r in range(0, rows, step):
            yield (n * rows + r) * cols, matrix[:, r:r + step] if transposed else matrix[r:r + step]


def copy_block(dst: np.ndarray, src: np.ndarray, transposed: bool) -> None:
    """dst[...] = src (transposed: with src's last two axes swapped), casting; tiled so transposes run fast."""
    if src.dtype == dst.dtype:  # copy bits: numpy holds the GIL and runs slower for ml_dtypes' bfloat16
        raw = np.dtype(f"u{src.dtype.itemsize}")
        src, dst = src.view(raw), dst.view(raw)
    if not transposed:
        np.copyto(dst, src, casting="unsafe")
        return
    tile = min(64, max(16, _TILE_BYTES // max(1, src.shape[-1] * src.itemsize)))  # rows; measured best on x86
    for i in range(0, src.shape[-2], tile):
        np.copyto(dst[..., i:i + tile], src[..., i:i + tile, :].swapaxes(-1, -2), casting="unsafe")


def param_dtype(spec: ParamSpec, tensors: Mapping[str, TensorInfo], dtype=None, router_dtype=None) -> np.dtype:
    """`dtype` (default: the spec's), except that the router keeps its stored dtype unless `router_dtype`."""
    if spec.is_router:
        return np.dtype(router_dtype) if router_dtype else np.result_type(*(tensors[p.name].dtype for p in spec.pieces))
    return np.dtype(dtype) if dtype else spec.dtype


def iter_params(tensors: Mapping[str, TensorInfo], specs: list[ParamSpec], *, dtype=None,
                router_dtype=None) -> Iterator[tuple[ParamSpec, np.ndarray]]:
    """Yield (spec, host array) one parameter at a time, each built in a fresh buffer from memory-mapped tensors.

    `dtype` (default: each spec's) applies to every parameter but the router, which keeps its stored dtype
    unless `router_dtype` is given.
    """
    for spec, items in itertools.groupby(iter_pieces(tensors, specs), key=lambda item: item[0]):
        buf = np.empty(spec.shape, param_dtype(spec, tensors, dtype, router_dtype))
        for _, piece, _, src in items:
            copy_block(buf[piece.index], src, spec.transposed)
        yield spec, buf
        del buf


def load_hf_checkpoint(directory: str | Path, config: ModelConfig, *, dtype=None, router_dtype=None,
                       shardings: Mapping | None = None) -> dict:
    """Read a Hugging Face safetensors checkpoint (either layout) into the M1Model parameter tree.

    Parameters are cast to `dtype` (default config.dtype); the router keeps its stored dtype unless
    `router_dtype` is given. With `shardings` (the same tree of jax.sharding.Sharding), each parameter is
    placed into its sharding as soon as it is assembled; otherwise the leaves are numpy arrays.
    """
    tensors = scan_checkpoint(directory)
    _, specs = check_checkpoint(tensors, config, directory)
    params: dict = {}
    for spec, host in iter_params(tensors, specs, dtype=dtype or config.dtype, router_dtype=router_dtype):
        if shardings is not None:
            sharding = get_path(shardings, spec.path)
            host = jax.make_array_from_callback(host.shape, sharding, lambda idx, a=host: a[idx])
        set_path(params, spec.path, host)
    return params


# ---- export -------------------------------------------------------------------------------------
def iter_hf_tensors(params: Mapping, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(name, contiguous numpy tensor) in the ORIGINAL layout's names and HF orientation, parameter by parameter."""
    for spec in param_specs(config, "original"):
        param = np.asarray(get_path(params, spec.path))
        if tuple(param.shape) != spec.shape:
            raise CheckpointError(f"parameter {'/'.join(map(str, spec.path))} has shape {list(param.shape)}, "
                                  f"config expects {list(spec.shape)}")
        for piece in spec.pieces:
            out = np.empty(piece.shape, param.dtype)
            copy_block(out, param[piece.index], spec.transposed)
            yield piece.name, out


def safetensors_dtype(dtype: np.dtype) -> str:
    """The safetensors dtype name of a weight dtype."""
    try:
        return _ST_NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"dtype {np.dtype(dtype)} cannot be written as a weight") from None


# ---- nested parameter dicts ---------------------------------------------------------------------
def get_path(tree: Mapping, path: ParamPath):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: ParamPath, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
