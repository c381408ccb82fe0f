"""The default model: its task, its recipe (a few steps, end to end), and the shipped model's accuracy."""

import json
import random

import numpy as np

from m1jax import from_pretrained
from m1jax.default_model import default_model_path
from m1jax.tokenizer import load_tokenizer
from train.recipes.arithmetic import (CONFIG, Task, answer_of, completion, evaluate, is_held_out, problems, result,
                                      run_recipe, sample_problem)


def test_scratchpad_columns_spell_the_answer():
    task, rng = Task(), random.Random(5)
    for _ in range(2000):
        a, op, b = sample_problem(task, rng)
        text = completion(a, op, b)
        word, items = text[len("<think>"):text.index("</think>")].split(":")
        digits = [item.split("=")[1] for item in items.split(",")]
        last = items.split(",")[-1]
        x, _, y, _, carry = last.split("=")[0]
        final_carry = int(op == "+" and int(x) + int(y) + int(carry) >= 10)
        assert int(str(final_carry) + "".join(reversed(digits))) == abs(result(a, op, b)), text
        assert answer_of(text) == str(eval(f"{a}{op}{b}"))
        assert word == ("add" if op == "+" else "sub" if a >= b else "neg")


def test_held_out_problems_never_reach_training():
    task = Task()
    held = problems(task, 300, True, 7)
    assert len(set(held)) == 300 and all(is_held_out(task, *p) for p in held)
    assert not any(is_held_out(task, *p) for p in problems(task, 3000, False, 8))


def test_recipe_runs_a_few_steps_and_exports_a_loadable_model(tmp_path):
    report = run_recipe(CONFIG, tmp_path, ["run.steps=3", "task.train_problems=300", "task.tokenizer_problems=300",
                                           "data.batch_size=8"], eval_problems=4)
    assert report["steps"] == 3 and report["problems"] == 4
    model = from_pretrained(tmp_path / "model")
    tok = load_tokenizer(tmp_path / "model")
    assert tok.vocab_size == model.config.vocab_size == 268 and model.config.eos_token_id == tok.eos_token_id
    assert {"lightning", "softmax"} == set(model.config.layer_types) and model.config.num_experts == 4
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])


def test_shipped_model_answers_held_out_problems():
    """The promise in recipe.json (>= 90% exact answers on held-out problems), checked on 100 of them."""
    path = default_model_path()
    report = json.loads((path / "recipe.json").read_text())
    task = Task(**report["task"])
    model = from_pretrained(None)
    assert model.config.dtype == "float32"
    metrics = evaluate(model, load_tokenizer(path), task, n=100)
    assert metrics["answer_accuracy"] >= 0.9, metrics
