"""Tokenizers behind one interface: Hugging Face `tokenizer.json` (M1's byte-level BPE) and SentencePiece models.

Also trains the byte-level BPE tokenizer of the project's small models (`train_bpe_tokenizer`) and turns a stream
of generated ids into text without splitting multi-byte characters (`StreamDecoder`).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BEGIN_OF_DOCUMENT = "<begin_of_document>"
BEGIN_OF_SENTENCE = "<beginning_of_sentence>"
END_OF_SENTENCE = "<end_of_sentence>"
END_OF_DOCUMENT = "<end_of_document>"
M1_SPECIAL_TOKENS = (BEGIN_OF_DOCUMENT, BEGIN_OF_SENTENCE, END_OF_SENTENCE, END_OF_DOCUMENT)
THINK_TOKENS = ("<think>", "</think>")

_REPLACEMENT_CHAR = "\ufffd"  # what both libraries decode an incomplete UTF-8 sequence to


class Tokenizer(abc.ABC):
    """Text <-> ids. `eos_token_id` is M1's `<end_of_sentence>` when the vocabulary has it, else the tokenizer's own EOS."""

    vocab_size: int  # 1 + the largest id, so an embedding of this many rows covers every token

    def __init__(self, own_eos_token_id: int | None):
        eos = self.token_to_id(END_OF_SENTENCE)
        self.eos_token_id: int | None = own_eos_token_id if eos is None else eos
        self._anchor_ids = self.encode("a")  # decoded ahead of a stream window, see `decode_continuation`

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation (M1 stops on `<end_of_sentence>` only)."""
        return () if self.eos_token_id is None else (self.eos_token_id,)

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it (`<end_of_sentence>`, ...) become single ids.

        add_special_tokens: also apply the tokenizer's own additions (tokenizer.json post-processor; SentencePiece BOS).
        """

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, None if there is none."""

    @abc.abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the tokenizer file (into `path` if it is a directory or has no suffix); returns the file written."""

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Incomplete UTF-8 sequences decode to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._decode(ids, skip_special_tokens)

    def decode_continuation(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text that `ids` add after already decoded text (decoders strip a leading space only at the very start)."""
        head = self.decode(self._anchor_ids, skip_special_tokens)
        return self.decode([*self._anchor_ids, *ids], skip_special_tokens)[len(head):]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str | None = None):
        self._tokenizer = tokenizer
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        super().__init__(None if eos_token is None else tokenizer.token_to_id(eos_token))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def save(self, path: str | Path) -> Path:
        target = _save_target(path, "tokenizer.json")
        self._tokenizer.save(str(target))
        return target


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Decoding follows sentencepiece: control symbols (`<s>`, `</s>`) never render and
    user-defined symbols always do, so `skip_special_tokens` has no effect here."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor):
        self._sp = processor
        self.vocab_size = processor.get_piece_size()
        eos = processor.eos_id()
        super().__init__(eos if eos >= 0 else None)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=add_special_tokens and self._sp.bos_id() >= 0)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def save(self, path: str | Path) -> Path:
        target = _save_target(path, "tokenizer.model")
        target.write_bytes(self._sp.serialized_model_proto())
        return target


class StreamDecoder:
    """Incremental detokenizer: `push` new ids, get the newly completed text.

    Text is held back while it ends in an incomplete multi-byte character; `flush` returns what is left at the end.
    The concatenation of all returned pieces equals `tokenizer.decode(all ids)`. Each push decodes only the ids
    since the last emitted piece, so the cost per token does not grow with the length of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._pending: list[int] = []  # ids not yet emitted as text; they start on a character boundary
        self._emitted = False  # once text went out, pending ids decode as a continuation of it

    def push(self, ids: Iterable[int]) -> str:
        self._pending.extend(ids)
        text = self._decode_pending()
        if not text or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._pending.clear()
        self._emitted = True
        return text

    def flush(self) -> str:
        """The text of the ids still held back (an unfinished character decodes to U+FFFD)."""
        text = self._decode_pending()
        self._pending.clear()
        self._emitted = self._emitted or bool(text)
        return text

    def _decode_pending(self) -> str:
        if self._emitted:
            return self._tokenizer.decode_continuation(self._pending, self._skip_special_tokens)
        return self._tokenizer.decode(self._pending, self._skip_special_tokens)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json or SentencePiece .model file, or the one in directory `path`.

    For tokenizer.json, a `tokenizer_config.json` beside it names the EOS used when there is no `<end_of_sentence>`.
    """
    path = Path(path)
    if path.is_dir():
        path = _tokenizer_file_in(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.suffix == ".json":
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return HFTokenizer(tokenizer, eos_token=_config_eos_token(path.parent / "tokenizer_config.json"))
    if path.suffix == ".model":
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        return SentencePieceTokenizer(processor)
    raise ValueError(f"{path}: expected a tokenizer.json or a SentencePiece .model file")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = M1_SPECIAL_TOKENS,
    added_tokens: Sequence[str] = THINK_TOKENS,
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (M1's format) on `texts`; the same input gives the same tokenizer.json.

    `vocab_size` counts everything. As in M1, the special tokens (skipped by `decode(skip_special_tokens=True)`)
    and then the added tokens (`<think>`, `</think>`: single ids that always decode) take the last ids.
    With too little text for all merges the vocabulary comes out smaller than `vocab_size`.
    """
    extra = len(special_tokens) + len(added_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + extra:
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(alphabet)} byte symbols plus {extra} special/added tokens"
        )
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - extra, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(list(special_tokens))
    tokenizer.add_tokens(list(added_tokens))
    return HFTokenizer(tokenizer)


def _tokenizer_file_in(directory: Path) -> Path:
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    models_found = sorted(directory.glob("*.model"))
    if len(models_found) == 1:
        return models_found[0]
    if (directory / "tokenizer.model").is_file():
        return directory / "tokenizer.model"
    found = ", ".join(p.name for p in models_found) or "none"
    raise FileNotFoundError(
        f"{directory} holds no tokenizer.json and no single SentencePiece .model file (.model files: {found})"
    )


def _config_eos_token(config_path: Path) -> str | None:
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text()).get("eos_token")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config_path} is not a JSON object: {e}") from e
    return eos.get("content") if isinstance(eos, dict) else eos


def _save_target(path: str | Path, file_name: str) -> Path:
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
