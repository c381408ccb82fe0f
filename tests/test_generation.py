"""Generation against transformers' generate and against the model's own full forward.

One random tiny model (fp32, block size 4, layers L L L S) loaded from a transformers checkpoint through
from_pretrained. Prompts of 11 and 19 tokens and 24 new tokens cross several lightning blocks. The tests
share shapes (batch 3 x 19 and batch 1 x 11, 24 steps) so that the few compiled programs are reused.
"""

import math
import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch

import m1jax
from hf_oracle import hf_config, random_hf_model, save_hf_model
from m1jax.cache import init_cache, load_cache, save_cache
from m1jax.generation import Sampling, _RowText, decode_step, prefill, row_keys, sample
from m1jax.model import forward
from m1jax.tokenizer import train_bpe_tokenizer

NEW = 24
RNG = np.random.default_rng(0)
P1, P2, P3 = (RNG.integers(0, 128, n).tolist() for n in (11, 19, 19))


@pytest.fixture(scope="module")
def hf_and_model(tmp_path_factory):
    hf = random_hf_model(hf_config(block_size=4), seed=0)
    path = save_hf_model(hf, tmp_path_factory.mktemp("hf") / "m")
    return hf, m1jax.from_pretrained(path), path


@pytest.fixture(scope="module")
def model(hf_and_model):
    return hf_and_model[1]


@pytest.fixture(scope="module")
def greedy3(model):
    """Greedy continuations of the left-padded batch [P1, P2, P3]."""
    return m1jax.generate(model, [P1, P2, P3], max_new_tokens=NEW)


@pytest.fixture(scope="module")
def greedy1(model):
    return m1jax.generate(model, [P1], max_new_tokens=NEW)


def hf_greedy(hf, prompts):
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0])),
                          max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0)
    logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    tokens = out.sequences[:, len(prompts[0]):]
    return tokens.numpy(), torch.gather(logprobs, 2, tokens[..., None])[..., 0].numpy()


def test_greedy_matches_transformers_generate(hf_and_model, greedy3):
    """The left-padded batch of 3 equals transformers on P1 alone and on the batch [P2, P3], token for token."""
    hf = hf_and_model[0]
    alone_tokens, alone_logprobs = hf_greedy(hf, [P1])
    pair_tokens, pair_logprobs = hf_greedy(hf, [P2, P3])
    want_tokens = np.concatenate([alone_tokens, pair_tokens])
    np.testing.assert_array_equal(np.asarray(greedy3.tokens), want_tokens)
    np.testing.assert_allclose(greedy3.logprobs, np.concatenate([alone_logprobs, pair_logprobs]), atol=2e-5)
    assert greedy3.sequences.shape == (3, 19 + NEW) and greedy3.finish_reasons == ["length"] * 3
    np.testing.assert_array_equal(greedy3.sequences[0, 8:19], P1)  # left padding, then the prompt
    np.testing.assert_array_equal(greedy3.prompt_lengths, [11, 19, 19])


def test_routing_counts_every_token_and_layer(model, greedy3):
    cfg = model.config
    per_token = cfg.num_layers * cfg.num_experts_per_tok
    np.testing.assert_array_equal(greedy3.routing.prompt.sum((1, 2)), np.array([11, 19, 19]) * per_token)
    np.testing.assert_array_equal(greedy3.routing.generated.sum((1, 2)), np.full(3, NEW * per_token))
    assert greedy3.routing.prompt.shape == (3, cfg.num_layers, cfg.num_experts)
    assert not greedy3.routing.skipped.any()


def test_left_padded_row_equals_the_prompt_alone(greedy1, greedy3):
    np.testing.assert_array_equal(greedy1.tokens[0], greedy3.tokens[0])
    np.testing.assert_allclose(greedy1.logprobs[0], greedy3.logprobs[0], atol=1e-5)


def padding_mask(out):
    """The attention mask of `out.sequences` (left padding, then the prompt and the new tokens)."""
    width = out.sequences.shape[1] - out.logprobs.shape[1]
    return np.arange(out.sequences.shape[1])[None, :] >= (width - out.prompt_lengths)[:, None]


def test_each_decode_step_equals_a_full_forward(model, greedy3):
    """prefill + decode_step one token at a time: every step's logits equal one forward over all tokens."""
    mask = padding_mask(greedy3)
    cache = init_cache(model.config, 3, 19 + NEW)
    logits, cache, _, _ = prefill(model, cache, jnp.asarray(greedy3.sequences[:, :19]), jnp.asarray(mask[:, :19]))
    steps = [logits]
    for t in range(NEW - 1):
        logits, cache = decode_step(model, cache, jnp.asarray(greedy3.sequences[:, 19 + t]))
        steps.append(logits)
    full = forward(model, jnp.asarray(greedy3.sequences[:, :-1]), attention_mask=jnp.asarray(mask[:, :-1]))
    full = full.logits[:, 18:]
    steps = jnp.stack(steps, 1)
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5 * float(jnp.abs(full).max()))
    np.testing.assert_array_equal(jnp.argmax(steps, -1), greedy3.tokens)  # the while_loop's greedy tokens


def test_chunked_prefill_equals_one_shot(model):
    outs = [prefill(model, init_cache(model.config, 1, 11 + NEW), jnp.asarray([P1]), chunk_size=c)
            for c in (4, 2048)]  # 3 + 4 + 4 tokens, and all 11 at once
    (chunked_logits, chunked, _, _), (one_logits, one, _, _) = outs
    scale = float(jnp.abs(one_logits).max())
    np.testing.assert_allclose(chunked_logits, one_logits, rtol=1e-5, atol=1e-5 * scale)
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)


def test_restored_snapshot_continues_like_the_uninterrupted_run(model, greedy1, tmp_path):
    """Prefill the first 7 tokens, save, restore, feed the other 4 and generate: the same tokens as P1 at once."""
    cache = init_cache(model.config, 1, 11 + NEW)
    _, cache, _, _ = prefill(model, cache, jnp.asarray([P1[:7]]), chunk_size=4)
    path = save_cache(tmp_path / "doc.npz", cache, model.config, tokens=[P1[:7]])
    snap = load_cache(path, max_len=11 + NEW, config=model.config)
    assert snap.num_tokens == 7 and snap.tokens.tolist() == [P1[:7]]
    restored = m1jax.generate(model, [P1[7:]], max_new_tokens=NEW, cache=snap.cache)
    in_memory = m1jax.generate(model, [P1[7:]], max_new_tokens=NEW, cache=cache)
    np.testing.assert_array_equal(restored.logprobs, in_memory.logprobs)  # the snapshot is exact
    assert restored.tokens == greedy1.tokens
    np.testing.assert_allclose(restored.logprobs, greedy1.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="without padding"):
        m1jax.generate(model, [P1[7:], P1[8:]], max_new_tokens=NEW, cache=init_cache(model.config, 2, 8) | {
            "offset": jnp.int32(3)})


@pytest.fixture(scope="module")
def sampled(model):
    kw = dict(max_new_tokens=NEW, temperature=1.3, top_k=6, top_p=0.8)
    return kw, [m1jax.generate(model, [P1, P2, P3], seed=s, **kw) for s in (5, 5, 6)]


def test_fixed_seed_is_reproducible_and_per_row(model, sampled):
    kw, (a, b, c) = sampled
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert a.tokens != c.tokens
    # row i samples with seed + i, whatever the batch: P1 as row 2 with seed 4 + 2 is row 0 with seed 6
    moved = m1jax.generate(model, [P2, P3, P1], seed=4, **kw)
    assert moved.tokens[2] == c.tokens[0]


def test_sampled_tokens_stay_in_the_top_k_top_p_set(model, sampled):
    kw, (a, _, _) = sampled
    mask = padding_mask(a)
    logits = np.asarray(forward(model, jnp.asarray(a.sequences[:, :-1]), attention_mask=jnp.asarray(mask[:, :-1]))
                        .logits)
    for i in range(3):
        for t in range(NEW):
            allowed = allowed_set(logits[i, 18 + t] / kw["temperature"], kw["top_k"], kw["top_p"])
            assert a.tokens[i][t] in allowed, (i, t)


def allowed_set(logits, top_k, top_p) -> set[int]:
    """numpy: the top_k most likely tokens, then the smallest prefix of them whose renormalised mass >= top_p."""
    order = np.argsort(-logits, kind="stable")[:top_k]
    p = np.exp(logits[order] - logits[order].max())
    p /= p.sum()
    keep = (np.cumsum(p) - p) < top_p
    return set(order[keep].tolist())


def test_sampler_never_leaves_the_allowed_set():
    """500 draws per row from random logits, several top-k/top-p settings in one batch."""
    v = 50
    logits = jax.random.normal(jax.random.key(0), (4, v)) * 3
    s = Sampling(jnp.array([0.7, 1.0, 1.5, 1.0]), jnp.array([1, 5, 0, 20]), jnp.array([1.0, 0.9, 0.3, 0.5]),
                 row_keys([0, 1, 2, 3]))
    draws = np.asarray(jax.jit(jax.vmap(lambda step: sample(logits, s, step, "filtered")))(jnp.arange(500)))
    for i in range(4):
        allowed = allowed_set(np.asarray(logits[i]) / float(s.temperature[i]), int(s.top_k[i]) or v,
                              float(s.top_p[i]))
        assert set(draws[:, i].tolist()) <= allowed
        assert len(set(draws[:, i].tolist())) == len(allowed)  # and every allowed token does occur
    greedy = sample(logits, s._replace(temperature=jnp.zeros(4)), 0, "filtered")
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))


def thinking_reference(natural, in_think, budget, open_id, close_id):
    """The budget rule on the host: tokens follow `natural` until an open block holds `budget` tokens."""
    out, count = [], 0
    for t in natural:
        if in_think and count >= budget:
            return out + [close_id]
        out.append(t)
        if t == open_id:
            in_think, count = True, 0
        elif t == close_id:
            in_think = False
        elif in_think:
            count += 1
    return out


def test_thinking_budget_closes_the_block_at_the_budget(model, greedy3):
    """Row 0's prompt ends with <think>; row 1 opens the block itself (its first greedy token plays <think>)."""
    think = greedy3.tokens[1][0]
    prompts = [P1[:-1] + [think], P2, P3]
    natural = m1jax.generate(model, prompts, max_new_tokens=NEW)
    close = next(t for t in range(128) if t != think and all(t not in row for row in natural.tokens))
    budgets = [3, 2, 1]
    out = m1jax.generate(model, prompts, max_new_tokens=NEW, thinking_budget=budgets, think_ids=(think, close))
    for i in range(3):
        want = thinking_reference(natural.tokens[i], i == 0, budgets[i], think, close)
        assert out.tokens[i][:len(want)] == want, i
        if i < 2:
            assert want[-1] == close  # the budget did run out in these rows
    assert out.tokens[1][:4] == [think] + natural.tokens[1][1:3] + [close]
    with pytest.raises(ValueError, match="single tokens"):
        m1jax.generate(model, [P1], max_new_tokens=2, thinking_budget=4)


def test_stop_token_ends_each_row_at_its_first_occurrence(model, greedy3):
    stop = greedy3.tokens[1][3]
    out = m1jax.generate(model, [P1, P2, P3], max_new_tokens=NEW, stop=[stop])
    for row, natural in zip(out.tokens, greedy3.tokens):
        end = natural.index(stop) + 1 if stop in natural else NEW
        assert row == natural[:end]
    assert out.finish_reasons[1] == "stop" and out.lengths[1] <= 4
    assert (out.sequences[1, 19 + out.lengths[1]:] == stop).all()  # padded with the stop id after the end


def test_expert_threshold_skips_low_weight_experts(model, greedy3):
    cfg = model.config
    same = m1jax.generate(model, [P1, P2, P3], max_new_tokens=NEW, expert_threshold=0.0)
    np.testing.assert_array_equal(same.sequences, greedy3.sequences)
    out = m1jax.generate(model, [P1, P2, P3], max_new_tokens=NEW, expert_threshold=1.0)  # only the top expert
    tokens = np.array([11, 19, 19]) + out.lengths
    np.testing.assert_array_equal(out.routing.skipped.sum((1, 2)), tokens * cfg.num_layers)
    assert not np.array_equal(out.logprobs, greedy3.logprobs)


def test_bad_inputs_are_refused_with_a_reason(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        m1jax.generate(model, [P1, []])
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        m1jax.generate(model, [[1, 200]])
    with pytest.raises(ValueError, match="temperature"):
        m1jax.generate(model, [P1], temperature=-1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        m1jax.generate(model, "some text")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        m1jax.generate(model, [P1], stop="\n")
    with pytest.raises(ValueError, match="one value per prompt"):
        m1jax.generate(model, [P1, P2], max_new_tokens=[1, 2, 3])


def test_stop_strings_cut_the_text_and_hold_back_partial_matches():
    tok = train_bpe_tokenizer(["the cat sat on the mat. the end."] * 20, vocab_size=300)
    ids = tok.encode("the cat sat on the mat. the end.")
    text = _RowText(tok, ["mat.", "zzz"])
    pieces, cut = [], None
    for i, t in enumerate(ids):
        piece, hit = text.push([t], final=False)
        pieces.append(piece)
        if hit is not None:
            cut = i
            break
    assert "".join(pieces) == "the cat sat on the "
    assert tok.decode(ids[:cut + 1]).endswith("mat.") and not tok.decode(ids[:cut]).endswith("mat.")
    held = _RowText(tok, ["on the rug"])
    first, _ = held.push(tok.encode("the cat sat on the"), final=False)
    assert first == "the cat sat "  # "on the" may start the stop string
    rest, hit = held.push(tok.encode(" mat"), final=True)
    assert first + rest == "the cat sat on the mat" and hit is None


def test_cli_streams_the_same_tokens(hf_and_model, greedy1, capsys):
    from infer.cli import main

    path = hf_and_model[2]
    assert main(["--model", str(path), "--prompt", " ".join(map(str, P1)), "--temperature", "0",
                 "--max-new-tokens", str(NEW), "--segment", "5", "--show-routing"]) == 0
    out, err = capsys.readouterr()
    assert [int(t) for t in out.split()] == greedy1.tokens[0]
    assert "finish: length" in err and "layer   3:" in err


def test_cli_on_a_mesh(hf_and_model, greedy1, capsys):
    """--mesh shards the model over all 8 devices (one axis filled in); a mesh the model cannot split is refused
    with the numbers."""
    from infer.cli import main

    args = ["--model", str(hf_and_model[2]), "--prompt", " ".join(map(str, P1)), "--temperature", "0",
            "--max-new-tokens", str(NEW)]
    assert main(args + ["--mesh", "expert=2,tensor=2,data=-1"]) == 0
    out, err = capsys.readouterr()
    assert [int(t) for t in out.split()] == greedy1.tokens[0] and "data=2 fsdp=1 context=1 expert=2 tensor=2" in err
    with pytest.raises(SystemExit, match="num_heads=4: dimension 'heads' of size 4 does not divide over mesh axes"):
        main(args + ["--mesh", "tensor=8"])
    with pytest.raises(SystemExit, match="expected AXIS=SIZE"):
        main(args + ["--mesh", "model=8"])


@pytest.mark.parametrize("sizes", [dict(tensor=2), dict(data=2, expert=2, tensor=2), dict(context=2, tensor=2)])
def test_sharded_generation_equals_unsharded(model, greedy3, sizes):
    """On a mesh: expert-parallel MoE, per-device lightning kernels, the batch of 3 padded to whole rows per
    device (4 rows over data x expert); over "context" the prefill splits the prompts and decoding does not."""
    from m1jax.loading import shard_model
    from m1jax.sharding import make_mesh

    mesh = make_mesh(**sizes, devices=jax.devices()[:math.prod(sizes.values())])
    out = m1jax.generate(shard_model(model, mesh), [P1, P2, P3], max_new_tokens=NEW, mesh=mesh)
    assert out.tokens == greedy3.tokens
    np.testing.assert_allclose(out.logprobs, greedy3.logprobs, atol=1e-5)
    state = out.cache["layers"][0]  # a lightning state [cycles, batch, heads, D, D]
    assert state.shape[1] == (4 if "data" in sizes else 3) and state.sharding.spec[2] == "tensor"
