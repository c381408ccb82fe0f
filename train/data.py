"""Token data: prepared corpora on disk (memory-mapped), and a deterministic, resumable packed-batch iterator.

A prepared directory holds `tokens.bin` (every document's ids back to back, uint16 or uint32), `index.npy`
(int64 document offsets, num_docs + 1 of them), `meta.json`, and optionally `prompt_lengths.npy` (per document,
how many leading tokens are prompt: they are read but never trained as targets, as in supervised fine-tuning).
`python -m train.data` (also `m1jax train prepare`) writes one from text with a project tokenizer.

Batches pack whole documents into rows of `seq_len` tokens: documents longer than a row are cut into row-sized
pieces first, then pieces are taken in a seeded per-epoch order and each row is filled greedily; the rest of a
row is padding (segment id 0). `segment_ids` number the pieces inside a row from 1, so attention and the
lightning state never cross a document boundary and the loss never predicts one document from another.
The iterator's whole state is (epoch, cursor): saving it with a checkpoint resumes the exact batch sequence.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

TOKENS, INDEX, META, PROMPTS = "tokens.bin", "index.npy", "meta.json", "prompt_lengths.npy"


class DataError(ValueError):
    """A prepared dataset that is missing, malformed or does not fit the model."""


# ---- writing -------------------------------------------------------------------------------------
def write_token_dataset(out_dir: str | Path, docs: Iterable[list[int]], vocab_size: int,
                        prompt_lengths: list[int] | None = None, **meta) -> Path:
    """Write documents (lists of ids) as a prepared directory; the id dtype is the smallest that holds vocab_size.
    `prompt_lengths`: per document, the number of leading tokens that are not trained as targets."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    offsets = [0]
    with open(out / TOKENS, "wb") as f:
        for doc in docs:
            ids = np.asarray(doc, np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise DataError(f"document {len(offsets) - 1}: token ids outside [0, {vocab_size})")
            f.write(ids.astype(dtype).tobytes())
            offsets.append(offsets[-1] + ids.size)
    np.save(out / INDEX, np.asarray(offsets, np.int64))
    if prompt_lengths is not None:
        if len(prompt_lengths) != len(offsets) - 1:
            raise DataError(f"{len(prompt_lengths)} prompt lengths for {len(offsets) - 1} documents")
        np.save(out / PROMPTS, np.asarray(prompt_lengths, np.int64))
    (out / META).write_text(json.dumps({"dtype": dtype.name, "vocab_size": vocab_size, "num_docs": len(offsets) - 1,
                                        "num_tokens": offsets[-1], **meta}, indent=1))
    return out


def read_documents(path: str | Path) -> Iterator[str]:
    """Documents of a text file: `.jsonl` (one {"text": ...} object per line) or plain text (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
                yield text
            else:
                yield line.rstrip("\n")


def prepare(inputs: list[str | Path], tokenizer_path: str | Path, out_dir: str | Path, append_eos: bool = True) -> Path:
    """Tokenize text files into a prepared directory (each document ends with the tokenizer's EOS)."""
    from m1jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if append_eos and tok.eos_token_id is None:
        raise DataError(f"{tokenizer_path}: the tokenizer has no EOS token; pass --no-eos")
    eos = [tok.eos_token_id] if append_eos else []
    docs = (tok.encode(text) + eos for path in inputs for text in read_documents(path))
    return write_token_dataset(out_dir, docs, tok.vocab_size, tokenizer=str(tokenizer_path))


# ---- reading -------------------------------------------------------------------------------------
class TokenDataset:
    """A prepared directory, memory-mapped."""

    def __init__(self, path: str | Path):
        path = Path(path)
        for name in (TOKENS, INDEX, META):
            if not (path / name).is_file():
                raise DataError(f"{path}: missing {name}; write the directory with `m1jax train prepare`")
        self.path = path
        self.meta = json.loads((path / META).read_text())
        self.offsets = np.load(path / INDEX)
        self.tokens = np.memmap(path / TOKENS, dtype=np.dtype(self.meta["dtype"]), mode="r")
        if self.offsets[-1] != self.tokens.size or np.any(np.diff(self.offsets) < 0):
            raise DataError(f"{path}: {INDEX} does not describe {TOKENS} ({self.tokens.size} tokens)")
        self.vocab_size = int(self.meta["vocab_size"])
        self.prompt_lengths = np.load(path / PROMPTS) if (path / PROMPTS).is_file() else None
        if self.prompt_lengths is not None and self.prompt_lengths.shape != (len(self.offsets) - 1,):
            raise DataError(f"{path}: {PROMPTS} does not have one entry per document")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size > vocab_size:
            raise DataError(f"{self.path}: prepared with a vocabulary of {self.vocab_size} tokens, more than "
                            f"the model's vocab_size={vocab_size}")


class DataState(NamedTuple):
    epoch: int
    cursor: int  # the next piece, in this epoch's order


class Batch(NamedTuple):
    input_ids: np.ndarray  # [rows, seq_len] int32 (0 at padding)
    segment_ids: np.ndarray  # [rows, seq_len] int32, 1, 2, ... per packed piece, 0 at padding
    loss_mask: np.ndarray  # [rows, seq_len] bool: the token may be a training target (False in prompts, padding)


class PackedBatches:
    """Endless packed batches of `batch_size` rows; this process gets rows [rows_per_process * index, ...)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int,
                 state: DataState = DataState(0, 0), process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} does not split over {process_count} processes")
        lengths = np.diff(dataset.offsets)
        counts = -(-lengths // seq_len)  # pieces per document
        if counts.sum() == 0:
            raise DataError(f"{dataset.path}: no tokens")
        doc = np.repeat(np.arange(len(lengths)), counts)
        first = np.cumsum(counts) - counts
        within = (np.arange(doc.size) - first[doc]) * seq_len  # the piece's offset inside its document
        self.piece_start = dataset.offsets[doc] + within
        self.piece_len = np.minimum(dataset.offsets[doc + 1] - self.piece_start, seq_len)
        prompts = np.zeros(len(lengths), np.int64) if dataset.prompt_lengths is None else dataset.prompt_lengths
        self.piece_prompt = np.clip(prompts[doc] - within, 0, self.piece_len)  # leading prompt tokens
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        self.rows = range(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
        self.state = DataState(*state)
        self._order = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.piece_len.size))
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        ids = np.zeros((len(self.rows), self.seq_len), np.int32)
        seg = np.zeros((len(self.rows), self.seq_len), np.int32)
        mask = np.zeros((len(self.rows), self.seq_len), bool)
        epoch, cursor = self.state
        for row in range(self.batch_size):
            used, segment = 0, 0
            while True:
                if cursor == self.piece_len.size:
                    epoch, cursor = epoch + 1, 0
                piece = self.order(epoch)[cursor]
                n = int(self.piece_len[piece])
                if used + n > self.seq_len:
                    break
                if row in self.rows:
                    r = row - self.rows.start
                    start = int(self.piece_start[piece])
                    ids[r, used:used + n] = self.dataset.tokens[start:start + n]
                    seg[r, used:used + n] = segment + 1
                    mask[r, used + int(self.piece_prompt[piece]):used + n] = True
                used, segment, cursor = used + n, segment + 1, cursor + 1
        self.state = DataState(epoch, cursor)
        return Batch(ids, seg, mask)


# ---- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m1jax train prepare",
                                     description="Tokenize text into a prepared directory for training.")
    parser.add_argument("inputs", nargs="+", help=".jsonl files ({'text': ...} per line) or text files (one "
                                                  "document per line)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json / .model file or a directory holding one")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-eos", action="store_true", help="do not end each document with the EOS token")
    args = parser.parse_args(argv)
    out = prepare(args.inputs, args.tokenizer, args.out, append_eos=not args.no_eos)
    meta = json.loads((out / META).read_text())
    print(f"{out}: {meta['num_docs']} documents, {meta['num_tokens']} tokens ({meta['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
