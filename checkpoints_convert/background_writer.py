"""Write buffers to files on a background thread while the caller fills the next ones.

numpy's copies and the write system calls both release the GIL, so a converter that transposes on its own thread
and hands each finished slab to a BackgroundWriter keeps two cores busy. Memory stays bounded: slabs live in a
fixed pool of buffers, and `buffer()` waits while all of them are being written.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from m1jax.weights import copy_block, row_slabs

BUFFER_BYTES = 4 * 2**20  # per slab: amortises the Python cost per slab and stays small next to any parameter
BUFFERS = 4


def pwrite(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset` (os.pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def close_written(fd: int) -> None:
    """Close a file that is written in full, first asking the kernel to start writing it to disk (Linux): the
    disk then works while the conversion goes on, and the final sync (staging.sync_tree) has little left to do."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait
    os.close(fd)


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _libc_sync_file_range()


class OutputFile:
    """A file written at offsets, created (or truncated) on first use."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def pwrite(self, data, offset: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        pwrite(self._fd, data, offset)

    def close(self) -> None:
        if self._fd is not None:
            close_written(self._fd)
            self._fd = None


class BackgroundWriter:
    """A thread that runs the queued writes and calls one after another, in order.

    A write target is anything with `pwrite(data, offset)` and `close()`. The first error on the thread is raised
    by the next call here (the thread skips the remaining work but keeps handing buffers back, so nothing waits
    forever). Use it as a context manager: the thread always ends and every target is closed.
    """

    def __init__(self, buffer_bytes: int | None = None, buffers: int = BUFFERS):
        self.buffer_bytes = buffer_bytes or BUFFER_BYTES
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(buffers):
            self._free.put(np.empty(self.buffer_bytes, np.uint8))
        self._jobs: queue.Queue = queue.Queue(maxsize=buffers)  # bounds the caller's arrays waiting too
        self._error: BaseException | None = None
        self._targets: set = set()  # closed at the end whatever happened (closing twice is harmless)
        self._thread = threading.Thread(target=self._run, name="BackgroundWriter", daemon=True)
        self._thread.start()

    def buffer(self) -> np.ndarray:
        """A free uint8 buffer of `buffer_bytes` from the pool: fill the front of it, then `write_buffer` it."""
        self._raise_error()
        return self._free.get()

    def write_buffer(self, target, offset: int, buffer: np.ndarray, nbytes: int) -> None:
        """Write buffer[:nbytes] at `offset`, then return `buffer` to the pool."""
        self._targets.add(target)
        self._put(target.pwrite, (buffer[:nbytes], offset), buffer)

    def write(self, target, offset: int, data: np.ndarray) -> None:
        """Write `data` (C-contiguous; kept alive until written) at `offset`."""
        self._targets.add(target)
        self._put(target.pwrite, (data, offset))

    def write_block(self, target, offset: int, src: np.ndarray, transposed: bool, dtype: np.dtype) -> None:
        """Write the block `src` gives (with its last two axes swapped when `transposed`), cast to `dtype`, at
        `offset`: copied slab by slab into pool buffers, each written while the next is filled."""
        dtype = np.dtype(dtype)
        for first, part in row_slabs(src, transposed, self.buffer_bytes // dtype.itemsize):
            shape = part.shape[::-1] if transposed else part.shape
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > self.buffer_bytes:
                raise ValueError(f"a row of {nbytes} bytes does not fit a {self.buffer_bytes}-byte buffer")
            buffer = self.buffer()
            copy_block(buffer[:nbytes].view(dtype).reshape(shape), part, transposed)
            self.write_buffer(target, offset + first * dtype.itemsize, buffer, nbytes)

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the writer thread after the writes queued so far (e.g. closing a finished file)."""
        self._put(fn, ())

    def close(self) -> None:
        """Wait for everything queued, stop the thread, close every target, raise the thread's error if any."""
        self._stop()
        self._raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: skip what is queued and stop, without masking its exception
            self._error = self._error or exc
            self._stop()

    def _stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        for target in self._targets:
            target.close()

    def _put(self, fn: Callable, args: tuple, buffer: np.ndarray | None = None) -> None:
        self._raise_error()
        self._jobs.put((fn, args, buffer))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, buffer = job
            try:
                if self._error is None:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 -- raised again on the caller's thread
                self._error = e
            finally:
                if buffer is not None:
                    self._free.put(buffer)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
