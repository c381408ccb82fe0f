"""The train step and data pipeline: config parsing, packing, loss definition, accumulation, sharding, aux loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.model import forward, init_model, params_of
from m1jax.sharding import ShardingError, make_mesh
from tests.train_fixtures import compilation_cache, corpus, tiny_config  # noqa: F401 (fixture)
from train.config import TrainConfig, TrainConfigError
from train.data import DataError, DataState, PackedBatches, TokenDataset, prepare
from train.step import loss_terms, make_trainer


def run_steps(trainer, batches, n, state=None):
    state = trainer.init(trainer.random_params()) if state is None else state
    history = []
    for _ in range(n):
        b = next(batches)
        state, m = trainer.step(state, *(jax.device_put(x, trainer.batch_sharding) for x in b))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


# ---- config ----------------------------------------------------------------------------------------
def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: m1-tiny}\noptim: {lr: 1e-3}\nrun: {steps: 5}\n")
    cfg = TrainConfig.load(path, ["run.steps=7", "optim.eps=1e-15", "model.overrides.hidden_size=32"])
    assert (cfg.run.steps, cfg.optim.lr, cfg.optim.eps, cfg.optim.b2) == (7, 1e-3, 1e-15, 0.95)
    assert cfg.model_config().hidden_size == 32 and cfg.model_config().dtype == "float32"
    with pytest.raises(TrainConfigError, match="optim.lrr"):
        TrainConfig.load(path, ["optim.lrr=1"])
    with pytest.raises(TrainConfigError, match="grad_accum"):
        TrainConfig.load(path, ["data.batch_size=6", "data.grad_accum=4"])
    with pytest.raises(TrainConfigError, match="run.steps: expected int"):
        TrainConfig.load(path, ["run.steps=ten"])
    with pytest.raises(TrainConfigError, match=r"run.mesh: axes \['model'\] are not among"):
        TrainConfig.load(path, ["run.mesh={model: 2, context: 2}"])


# ---- data ------------------------------------------------------------------------------------------
def test_packing_is_deterministic_resumable_and_keeps_documents_whole(tmp_path):
    ds = TokenDataset(corpus(tmp_path / "d", docs=50))
    it = PackedBatches(ds, seq_len=32, batch_size=4, seed=3)
    batches = [next(it) for _ in range(6)]
    states = []
    it = PackedBatches(ds, seq_len=32, batch_size=4, seed=3)
    for _ in range(3):
        next(it)
        states.append(it.state)
    resumed = PackedBatches(ds, seq_len=32, batch_size=4, seed=3, state=states[-1])
    for b in batches[3:]:
        np.testing.assert_array_equal(next(resumed).input_ids, b.input_ids)
    docs = {tuple(ds.tokens[a:b]) for a, b in zip(ds.offsets[:-1], ds.offsets[1:])}
    pieces = 0
    for b in batches:
        for ids, seg in zip(b.input_ids, b.segment_ids):
            real = int(np.sum(seg > 0))
            assert np.all(seg[real:] == 0) and np.all(np.diff(seg[:real]) >= 0)  # padding only at the end
            for s in range(1, seg.max() + 1):
                assert tuple(ids[seg == s]) in docs  # every piece is one whole document (all fit in a row)
                pieces += 1
    assert pieces > 6 * 4  # rows hold several documents
    assert batches[-1].input_ids.tolist() != batches[0].input_ids.tolist()
    # the epoch wraps around into a new order
    assert states[-1].cursor > 0 and PackedBatches(ds, 32, 4, 3, DataState(5, 0)).order(5).tolist() != \
        PackedBatches(ds, 32, 4, 3).order(0).tolist()
    # two processes get the two halves of the same global batch
    halves = [next(PackedBatches(ds, 32, 4, 3, process_index=i, process_count=2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.input_ids for h in halves]), batches[0].input_ids)


def test_long_documents_are_cut_into_rows(tmp_path):
    from train.data import write_token_dataset
    ds = TokenDataset(write_token_dataset(tmp_path / "d", [list(range(1, 71))], 128, prompt_lengths=[40]))
    b = next(PackedBatches(ds, seq_len=32, batch_size=3, seed=0))
    assert sorted(int((s > 0).sum()) for s in b.segment_ids) == [6, 32, 32]
    assert sorted(b.input_ids[b.loss_mask].tolist()) == list(range(41, 71))  # the 40 prompt tokens are not targets
    assert sorted(np.concatenate([i[s > 0] for i, s in zip(b.input_ids, b.segment_ids)]).tolist()) == \
        list(range(1, 71))


def test_prepare_tokenizes_text_with_eos(tmp_path):
    from m1jax.tokenizer import train_bpe_tokenizer
    texts = ["the cat sat on the mat", "12+34=46", "a dog"]
    tok = train_bpe_tokenizer(texts * 20, vocab_size=300)
    tok_path = tok.save(tmp_path / "tok")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    (tmp_path / "c.txt").write_text("one more line\n\n")
    ds = TokenDataset(prepare([tmp_path / "c.jsonl", tmp_path / "c.txt"], tok_path, tmp_path / "out"))
    assert len(ds) == 4 and ds.tokens.dtype == np.uint16
    first = ds.tokens[ds.offsets[0]:ds.offsets[1]].tolist()
    assert first[-1] == tok.eos_token_id and tok.decode(first[:-1]) == texts[0]
    with pytest.raises(DataError, match="'text' field"):
        (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
        prepare([tmp_path / "bad.jsonl"], tok_path, tmp_path / "out2")
    with pytest.raises(DataError, match="vocab_size=64"):
        ds.check_vocab(64)


# ---- loss ------------------------------------------------------------------------------------------
def test_packed_loss_equals_documents_run_alone(tmp_path):
    """Padding, prompts and document boundaries are excluded, and nothing leaks between packed documents."""
    cfg = tiny_config(tmp_path).model_config()
    model = init_model(cfg, 1)
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 64, n).astype(np.int32) for n in (7, 12, 5)]
    ids = np.zeros((1, 32), np.int32)
    seg = np.zeros((1, 32), np.int32)
    at = 0
    for s, d in enumerate(docs, 1):
        ids[0, at:at + len(d)], seg[0, at:at + len(d)] = d, s
        at += len(d)
    ids[0, at:] = rng.integers(1, 64, 32 - at)  # garbage under padding must not matter
    prompt = 3  # the second document's first 3 tokens are its prompt
    mask = seg > 0
    mask[0, 7:7 + prompt] = False
    packed = loss_terms(model, params_of(model), jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(mask),
                        jnp.float32, "none").ce_sum
    alone = np.zeros((len(docs), 32), np.int32)  # each document alone at the start of a row
    for r, d in enumerate(docs):
        alone[r, :len(d)] = d
    logp = np.asarray(jax.nn.log_softmax(forward(model, jnp.asarray(alone)).logits))
    expected = -sum(logp[r, t, d[t + 1]] for r, d in enumerate(docs) for t in range(len(d) - 1)
                    if r != 1 or t + 1 >= prompt)
    np.testing.assert_allclose(float(packed), expected, rtol=1e-5)


def test_chunked_lm_head_gives_the_whole_heads_logprobs_and_gradients(tmp_path, monkeypatch):
    """next_token_logprobs with the head taken 8 positions at a time within each device's piece of the sequence
    (data=2 x context=2: pieces of 18 padded to 24) equals log_softmax of the full logits, and so do the parameter
    gradients."""
    from m1jax import model as model_module
    from m1jax.loading import shard_model
    from m1jax.model import next_token_logprobs, with_params

    cfg = tiny_config(tmp_path).model_config()
    model = init_model(cfg, 2)
    ids = jax.random.randint(jax.random.key(5), (4, 36), 0, cfg.vocab_size)
    weights = jax.random.normal(jax.random.key(6), (4, 35))

    def whole(params):
        logp = jax.nn.log_softmax(forward(with_params(model, params), ids).logits[:, :-1])
        return jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0] * weights)

    def chunked(params, model):
        model = with_params(model, params)
        return jnp.sum(next_token_logprobs(model, forward(model, ids, head=False).hidden, ids) * weights)

    want, want_grads = jax.value_and_grad(whole)(params_of(model))
    monkeypatch.setattr(model_module, "MAX_LOGIT_BYTES", 0)
    monkeypatch.setattr(model_module, "LOGIT_CHUNK", 8)
    mesh = make_mesh(data=2, context=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        sharded = shard_model(model, mesh)
        got, got_grads = jax.jit(jax.value_and_grad(chunked))(params_of(sharded), sharded)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())


def test_aux_loss_matches_transformers_on_the_models_router_logits(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers.models.minimax.modeling_minimax import load_balancing_loss_func
    import m1jax.layers.moe as moe

    cfg = tiny_config(tmp_path).model_config()
    model = init_model(cfg, 2)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 64, (2, 16)), jnp.int32)
    seg = jnp.asarray(np.r_[[1] * 10 + [2] * 4 + [0] * 2, [1] * 16].reshape(2, 16), jnp.int32)
    recorded = []
    route = moe.route

    def recording_route(x, router, top_k, *a, **k):
        out = route(x, router, top_k, *a, **k)
        jax.debug.callback(lambda logits: recorded.append(np.array(logits)), out[0], ordered=True)
        return out

    monkeypatch.setattr(moe, "route", recording_route)
    aux = float(loss_terms(model, params_of(model), ids, seg, seg > 0, jnp.float32, "none").aux)
    assert len(recorded) == cfg.num_layers
    expected = load_balancing_loss_func(tuple(torch.from_numpy(r) for r in recorded), cfg.num_experts,
                                        cfg.num_experts_per_tok, torch.from_numpy(np.array(seg > 0)))
    np.testing.assert_allclose(aux, float(expected), rtol=1e-5)


# ---- the step --------------------------------------------------------------------------------------
def test_loss_decreases_and_master_weights_stay_fp32(tmp_path):
    tcfg = tiny_config(tmp_path, run={"steps": 40, "compute_dtype": "bfloat16"})
    trainer = make_trainer(tcfg.model_config(), tcfg, make_mesh(devices=jax.devices()[:1]))
    state, hist = run_steps(trainer, PackedBatches(TokenDataset(tcfg.data.path), 32, 8, 0), 40)
    first, last = np.mean([h["ce"] for h in hist[:3]]), np.mean([h["ce"] for h in hist[-3:]])
    assert last < 0.6 * first, (first, last)
    assert all(h["skipped"] == 0 for h in hist) and int(state.step) == 40
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert 0 < hist[-1]["lr"] < hist[5]["lr"]  # cosine decay after warmup
    assert all(h["expert_load_max"] >= h["expert_load_mean"] >= 1 for h in hist)


def test_sharded_accumulated_step_equals_single_device_full_batch(tmp_path):
    """data x fsdp x expert = 2 x 2 x 2 virtual CPU devices, 2 accumulated micro-batches and remat, and sequences
    split in 4 over "context" (x 2 over "tensor"), against one device taking the whole batch at once (aux losses
    off: they are pooled per micro-batch)."""
    results = {}
    for name, accum, mesh in (("one", 1, make_mesh(devices=jax.devices()[:1])),
                              ("eight", 2, make_mesh(data=2, fsdp=2, expert=2)),
                              ("context", 1, make_mesh(context=4, tensor=2))):
        tcfg = tiny_config(tmp_path, data={"grad_accum": accum, "batch_size": 16},
                           loss={"aux_coef": 0.0, "z_coef": 0.0}, run={"remat": "full"})
        trainer = make_trainer(tcfg.model_config(), tcfg, mesh)
        state, hist = run_steps(trainer, PackedBatches(TokenDataset(tcfg.data.path), 32, 16, 0), 2)
        results[name] = (hist, state)
    w1 = results["eight"][1].params["cycles"]["layers"][0]["moe"]["w1"]
    assert len(w1.sharding.device_set) == 8 and w1.addressable_shards[0].data.shape[1] == 2  # experts split
    with pytest.raises(ShardingError, match="micro-batch is data.batch_size / data.grad_accum = 4 rows"):
        make_trainer(tcfg.model_config(), tiny_config(tmp_path, data={"grad_accum": 2}), make_mesh(data=8))
    with pytest.raises(ShardingError, match="size 36 does not divide over mesh axes context=8 .* of data.seq_len = "
                                            "36 tokens"):
        make_trainer(tcfg.model_config(), tiny_config(tmp_path, data={"seq_len": 36}), make_mesh(context=8))
    for other in ("eight", "context"):
        for a, b in zip(results["one"][0], results[other][0]):
            for k in ("loss", "ce", "grad_norm", "expert_load_max", "target_tokens"):
                np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=f"{other} {k}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                     results["one"][1].params, results[other][1].params)


def test_non_finite_step_is_skipped_without_touching_the_state(tmp_path):
    tcfg = tiny_config(tmp_path)
    trainer = make_trainer(tcfg.model_config(), tcfg, make_mesh(devices=jax.devices()[:1]))
    params = trainer.random_params()
    params["final_norm"]["weight"] = params["final_norm"]["weight"].at[0].set(jnp.nan)
    state = trainer.init(params)
    before = jax.tree.map(np.asarray, state)
    batch = next(PackedBatches(TokenDataset(tcfg.data.path), 32, 8, 0))
    state, m = trainer.step(state, *(jax.device_put(x, trainer.batch_sharding) for x in batch))
    assert m["skipped"] == 1 and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before.params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.opt_state), before.opt_state)


def test_remat_policies_give_the_same_gradients(tmp_path):
    from train.step import loss_and_grads
    from m1jax.model import abstract_model
    results = []
    for remat in ("none", "full", "dots", "sublayers"):
        tcfg = tiny_config(tmp_path, run={"remat": remat})
        cfg = tcfg.model_config()
        batch = next(PackedBatches(TokenDataset(tcfg.data.path), 32, 8, 0))
        params = params_of(init_model(cfg, 0))
        fn = jax.jit(lambda p, *b: loss_and_grads(abstract_model(cfg), tcfg, p, *b))
        results.append(fn(params, *map(jnp.asarray, batch)))
    for loss, _, grads in results[1:]:
        np.testing.assert_allclose(float(loss), float(results[0][0]), rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, results[0][2])


def test_multi_host_launchers_are_detected():
    from train.distributed import launched_multi_process
    assert not launched_multi_process({})
    assert not launched_multi_process({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    for env in ({"SLURM_NTASKS": "16"}, {"OMPI_COMM_WORLD_SIZE": "2"}, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"},
                {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {"M1JAX_DISTRIBUTED": "1"}):
        assert launched_multi_process(env), env


def test_shipped_configs_are_valid():
    from pathlib import Path
    from train.recipes.arithmetic import CONFIG, load_recipe_config
    configs = Path(__file__).resolve().parents[1] / "train" / "configs"
    assert TrainConfig.load(configs / "tiny.yaml").model_config().num_layers == 4
    task, tcfg = load_recipe_config(CONFIG, [])
    assert task.max_digits == 3 and tcfg.optim.b2 == 0.95 and tcfg.optim.eps == 1e-15
    assert set(tcfg.model_config().layer_types) == {"lightning", "softmax"}
