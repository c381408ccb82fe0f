"""zarr2 arrays whose chunks are uncompressed, in C order and split the leading axes only.

Such an array's bytes in C order are its chunk files one after another, so it is written at byte offsets from
buffers and read as memory maps of its chunk files: no encoding step, no decoding threads, no whole array in
memory. This is how m1jax stores parameters (orbax without OCDBT and compression writes the same format).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from checkpoints_convert.background_writer import close_written, pwrite
from m1jax.weights import CheckpointError, TensorInfo, safetensors_dtype

ZARRAY = ".zarray"


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """A zarr2 array in `directory` whose chunks take one index along the first `split` axes, all of the rest."""

    directory: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    split: int
    separator: str

    @classmethod
    def read(cls, directory: Path) -> ChunkLayout:
        """Parse `directory/.zarray`; a CheckpointError unless it describes this layout."""
        meta = json.loads((directory / ZARRAY).read_text())
        shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
        split = next(k for k in range(len(shape) + 1) if chunks[k:] == shape[k:])
        dtype = np.dtype(ml_dtypes.bfloat16) if meta["dtype"] == "bfloat16" else np.dtype(meta["dtype"])
        if meta.get("zarr_format") != 2 or meta.get("compressor") or meta.get("filters") \
                or meta.get("order", "C") != "C" or dtype.byteorder == ">" or any(c != 1 for c in chunks[:split]):
            raise CheckpointError(f"{directory / ZARRAY}: expected a zarr2 array of uncompressed little-endian "
                                  f"C-order chunks that split leading axes only, found {meta}")
        return cls(directory, shape, dtype, split, meta.get("dimension_separator", "."))

    @staticmethod
    def rewrite(directory: Path, shape: tuple[int, ...], split: int) -> ChunkLayout:
        """Give the array in `directory` this shape and chunks, keeping the rest of its .zarray."""
        meta = json.loads((directory / ZARRAY).read_text())
        meta |= {"shape": list(shape), "chunks": [1] * split + list(shape[split:])}
        _overwrite(directory / ZARRAY, json.dumps(meta).encode())
        return ChunkLayout.read(directory)

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.shape[self.split:]) * self.dtype.itemsize

    def chunk_file(self, index: tuple[int, ...]) -> Path:
        """The file of the chunk at `index` along the split axes."""
        return self.directory / self.separator.join(map(str, index + (0,) * (len(self.shape) - self.split)))

    def block(self, index: tuple[int, ...]) -> TensorInfo:
        """Where array[index] lies (`index` takes at least the split axes): its chunk file and byte range."""
        if len(index) < self.split:
            raise CheckpointError(f"{self.directory}: the block at {index} spans several chunk files")
        file = self.chunk_file(index[:self.split])
        if not file.is_file() or file.stat().st_size != self.chunk_bytes:
            raise CheckpointError(f"{file}: chunk file missing or not {self.chunk_bytes} bytes (incomplete array)")
        shape = self.shape[len(index):]
        nbytes = math.prod(shape) * self.dtype.itemsize
        start = int(np.ravel_multi_index(index[self.split:], self.shape[self.split:len(index)])) * nbytes \
            if len(index) > self.split else 0
        return TensorInfo(file.name, file, safetensors_dtype(self.dtype), shape, start, start + nbytes)


class ChunkedArray:
    """Writes an array of this layout at byte offsets of its C-order bytes, on one thread. A chunk file is
    created on first write (a shorter file of the same name is written over) and closed once all its bytes are
    written; `missing` counts the bytes not written yet."""

    def __init__(self, layout: ChunkLayout):
        self.layout = layout
        self._files = [layout.chunk_file(index) for index in np.ndindex(layout.shape[:layout.split])]
        self._missing = [layout.chunk_bytes] * len(self._files)
        self._fds: dict[int, int] = {}

    @property
    def missing(self) -> int:
        return sum(self._missing)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            k, start = divmod(offset, self.layout.chunk_bytes)
            n = min(len(view), self.layout.chunk_bytes - start)
            if k not in self._fds:
                self._fds[k] = os.open(self._files[k], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            pwrite(self._fds[k], view[:n], start)
            self._missing[k] -= n
            if self._missing[k] == 0:
                close_written(self._fds.pop(k))
            view, offset = view[n:], offset + n

    def close(self) -> None:
        """Close the chunk files still open (only after a failure: a complete chunk is closed when written)."""
        while self._fds:
            os.close(self._fds.popitem()[1])


def _overwrite(path: Path, data: bytes) -> None:
    """Replace a file's contents in place. (Unlinking a file that orbax has just synced, or truncating it to
    zero, costs milliseconds each on ext4: a journal wait, or a flush forced on close.)"""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
