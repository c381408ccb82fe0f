"""Tokenizer tests on tiny tokenizers trained here: a byte-level BPE (M1's format) and a SentencePiece model."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece

from m1jax.tokenizer import (
    M1_SPECIAL_TOKENS,
    THINK_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["hello", "world", "naïve", "café", "中文", "字符", "🤖", "tokens", "x1", "42", "a", "€", "👍🏽", "Ωmega", "ok?"]
TEXTS = ["hello world", "café naïve 中文 🤖 €", "x1 42 ok? 👍🏽 Ωmega"]


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n_lines)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(corpus(), vocab_size=320).save(directory)
    return directory


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> HFTokenizer:
    return load_tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> SentencePieceTokenizer:
    directory = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(directory / "tiny"),
        vocab_size=330,
        model_type="bpe",
        byte_fallback=True,  # characters outside the vocabulary become byte pieces, split across several ids
        character_coverage=0.99,
        user_defined_symbols=list(THINK_TOKENS),
        minloglevel=2,
    )
    return load_tokenizer(directory)


@pytest.fixture(params=["bpe", "sp"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    extra = [" ", "\n", "😀", "<think>", "</think>", "<end_of_sentence>", "  "]
    return ["".join(rng.choice(WORDS + extra) for _ in range(rng.randint(1, 20))) for _ in range(n)]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_loaded_backends(bpe, sp):
    assert isinstance(bpe, HFTokenizer)
    assert isinstance(sp, SentencePieceTokenizer)
    assert sp.vocab_size == 330


def test_special_and_think_tokens_are_single_ids_at_the_end(bpe):
    extra = [*M1_SPECIAL_TOKENS, *THINK_TOKENS]
    ids = [bpe.token_to_id(token) for token in extra]
    assert ids == list(range(bpe.vocab_size - len(extra), bpe.vocab_size))  # after the regular vocabulary, as in M1
    for token, i in zip(extra, ids):
        assert bpe.encode(f"a{token}b")[1] == i
        assert bpe.decode([i]) == token
    text = "<beginning_of_sentence>ai name=assistant\n<think>\nhm\n</think>\n42<end_of_sentence>"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode(ids, skip_special_tokens=True) == "ai name=assistant\n<think>\nhm\n</think>\n42"


def test_sentencepiece_user_symbols_and_bos(sp):
    think = sp.token_to_id("<think>")
    assert think is not None and sp.encode("a <think> b").count(think) == 1
    assert sp.encode("hello", add_special_tokens=True)[0] == sp.token_to_id("<s>")
    assert sp.encode("hello", add_special_tokens=True)[1:] == sp.encode("hello")


def test_eos_and_stop_ids(bpe, sp):
    assert bpe.eos_token_id == bpe.token_to_id("<end_of_sentence>")
    assert bpe.stop_token_ids == (bpe.eos_token_id,)
    # no <end_of_sentence> in this SentencePiece vocabulary: its own </s>
    assert sp.eos_token_id == sp.token_to_id("</s>") and sp.eos_token_id is not None
    assert sp.stop_token_ids == (sp.eos_token_id,)


def test_hf_eos_from_tokenizer_config(tmp_path):
    train_bpe_tokenizer(corpus(50), 300, special_tokens=("<|endoftext|>",), added_tokens=()).save(tmp_path)
    assert load_tokenizer(tmp_path).eos_token_id is None
    assert load_tokenizer(tmp_path).stop_token_ids == ()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<|endoftext|>") is not None


def test_token_to_id(tokenizer):
    assert tokenizer.token_to_id("<no such token>") is None
    assert tokenizer.token_to_id("<think>") is not None


def test_decode_rejects_ids_outside_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([-1])


def test_some_tokens_hold_partial_characters(tokenizer):
    """Guards the streaming tests: they only mean something if single ids can end inside a character."""
    ids = tokenizer.encode("😀 👍🏽")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_stream_decode_equals_full_decode(tokenizer):
    for skip in (False, True):
        for text in random_texts(60, seed=1):
            ids = tokenizer.encode(text)
            stream = tokenizer.stream_decoder(skip_special_tokens=skip)
            pieces = [stream.push([i]) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in piece for piece in pieces), (text, pieces)


def test_stream_decode_in_chunks(tokenizer):
    ids = tokenizer.encode("café 🤖 x1 <think>ok</think> 👍🏽")
    stream = tokenizer.stream_decoder()
    rng = random.Random(2)
    pieces, start = [], 0
    while start < len(ids):
        stop = start + rng.randint(1, 3)
        pieces.append(stream.push(ids[start:stop]))
        start = stop
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)


def test_stream_holds_back_a_partial_character(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # not in either vocabulary: several byte tokens
    stream = tokenizer.stream_decoder()
    assert [stream.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1:]) == "😀"
    first_byte = next(i for i in ids if tokenizer.decode([i]) == "\ufffd")
    partial = tokenizer.stream_decoder()
    assert partial.push([first_byte]) == ""
    assert partial.flush() == "\ufffd"


def test_save_and_load_round_trip(tokenizer, tmp_path):
    saved = tokenizer.save(tmp_path / "copy")
    assert saved.parent == tmp_path / "copy"
    for loaded in (load_tokenizer(saved), load_tokenizer(saved.parent)):
        assert type(loaded) is type(tokenizer)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.eos_token_id == tokenizer.eos_token_id
        for text in TEXTS:
            assert loaded.encode(text) == tokenizer.encode(text)


def test_bpe_training_is_deterministic_across_processes(tmp_path):
    rng = random.Random(3)  # random characters: many pair counts tie, where training could depend on hash order
    texts = ["".join(rng.choice("abcdefgh ijklé中🤖") for _ in range(60)) for _ in range(500)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    # Rust's hash maps are seeded per process, so the second training runs in a fresh interpreter. It loads
    # tokenizer.py by path, so that it does not pay for the package's jax import.
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('tok', {str(REPO_ROOT / 'm1jax' / 'tokenizer.py')!r})\n"
        "tok = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(tok)\n"
        "texts = json.loads(open(sys.argv[1], encoding='utf-8').read())\n"
        "tok.train_bpe_tokenizer(texts, vocab_size=600).save(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, tmp_path / "texts.json", tmp_path / "other"], check=True, timeout=60)
    here = train_bpe_tokenizer(texts, vocab_size=600).save(tmp_path / "here")
    assert here.read_bytes() == (tmp_path / "other" / "tokenizer.json").read_bytes()
    assert load_tokenizer(here).vocab_size == 600


def test_train_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size 200"):
        train_bpe_tokenizer(["abc"], vocab_size=200)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.model is not a valid SentencePiece"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="expected a tokenizer.json"):
        load_tokenizer(tmp_path / "vocab.txt")
