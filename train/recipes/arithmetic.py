"""The default model's recipe: a small M1 (lightning + softmax layers, 4 experts) that adds and subtracts.

Everything comes from a seed: problems `a+b=` / `a-b=` with 1..max_digits-digit operands, a byte-level BPE
tokenizer trained on them (m1jax.tokenizer.train_bpe_tokenizer), a prepared token directory whose prompts are
masked from the loss, a run of the normal training loop, a greedy-decoding evaluation on held-out problems
(a fixed hash of the problem puts 1 in `held_out_every` of them outside the training set), and the export:
config.json + model.safetensors (original HF names) + tokenizer.json, what `m1jax.from_pretrained` reads.

The answer comes after a short scratchpad that works column by column from the units, carrying/borrowing:

    123+459=<think>add:3+9+0=2,2+5+1=8,1+4+0=5</think>582<end_of_sentence>
    12-34=<think>neg:4-2-0=2,3-1-0=2</think>-22<end_of_sentence>      (neg: computes 34-12)

    python -m train.recipes.arithmetic [--config train/configs/arithmetic.yaml] [--out DIR] [--install]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "arithmetic.yaml"
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "recipe.json")


@dataclasses.dataclass(frozen=True)
class Task:
    max_digits: int = 3
    ops: str = "+-"
    held_out_every: int = 20  # 1 in this many problems is never trained on
    train_problems: int = 60_000
    tokenizer_problems: int = 4_000  # problems the tokenizer is trained on
    tokenizer_vocab: int = 268  # 256 bytes + 6 merges (add, sub, neg) + 6 special/added tokens
    eval_problems: int = 500
    seed: int = 0


# ---- the task ------------------------------------------------------------------------------------
def is_held_out(task: Task, a: int, op: str, b: int) -> bool:
    return (a * 7919 + b * 104_729 + (op == "-") * 15_485_863) % task.held_out_every == 0


def sample_problem(task: Task, rng: random.Random) -> tuple[int, str, int]:
    def number():
        digits = rng.randint(1, task.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)

    return number(), rng.choice(task.ops), number()


def problems(task: Task, n: int, held_out: bool, seed: int) -> list[tuple[int, str, int]]:
    """`n` problems from the held-out share (held_out=True, distinct) or the training share."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        p = sample_problem(task, rng)
        if is_held_out(task, *p) == held_out and not (held_out and p in seen):
            seen.add(p)
            out.append(p)
    return out


def prompt(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def completion(a: int, op: str, b: int) -> str:
    """The scratchpad and the answer (without the end-of-sentence token)."""
    word, x, y = ("add", a, b) if op == "+" else ("sub", a, b) if a >= b else ("neg", b, a)
    xs, ys = str(x)[::-1], str(y)[::-1]
    carry, items = 0, []
    for i in range(max(len(xs), len(ys))):
        dx, dy = (int(s[i]) if i < len(s) else 0 for s in (xs, ys))
        total = dx + dy + carry if op == "+" else dx - dy - carry
        items.append(f"{dx}{op}{dy}{op}{carry}={total % 10}")
        carry = int(total >= 10) if op == "+" else int(total < 0)
    return f"<think>{word}:{','.join(items)}</think>{result(a, op, b)}"


def result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def answer_of(text: str) -> str:
    """The final answer in generated text: what follows the scratchpad."""
    return text.split("</think>", 1)[-1].strip()


# ---- the pieces of the recipe --------------------------------------------------------------------
def build_tokenizer(task: Task):
    from m1jax.tokenizer import train_bpe_tokenizer

    texts = [prompt(*p) + completion(*p) for p in problems(task, task.tokenizer_problems, False, task.seed + 1)]
    # <think> and </think> become single added tokens after training; the merges are learnt from the rest
    texts = [t.replace("<think>", "").replace("</think>", "") for t in texts]
    tok = train_bpe_tokenizer(texts, task.tokenizer_vocab)
    for pair in (f"{i:02d}" for i in range(100)):  # digits must stay single tokens, in prompts and answers
        if len(tok.encode(pair)) != 2:
            raise RuntimeError(f"the trained tokenizer merged the digits {pair!r}; lower task.tokenizer_vocab")
    return tok


def prepare_data(task: Task, tok, out_dir: Path) -> Path:
    from train.data import write_token_dataset

    docs, prompt_lengths = [], []
    for p in problems(task, task.train_problems, False, task.seed + 2):
        head = tok.encode(prompt(*p))
        ids = tok.encode(prompt(*p) + completion(*p))
        if ids[:len(head)] != head:
            raise RuntimeError(f"{prompt(*p)!r} tokenizes differently alone and before its completion")
        docs.append(ids + [tok.eos_token_id])
        prompt_lengths.append(len(head))
    return write_token_dataset(out_dir, docs, tok.vocab_size, prompt_lengths=prompt_lengths)


def evaluate(model, tok, task: Task, n: int | None = None, batch: int = 250) -> dict:
    """Greedy-decode held-out problems; exact match of the final answer (and of the whole completion)."""
    from m1jax.generation import generate

    tests = problems(task, task.eval_problems if n is None else n, True, task.seed + 3)
    answers = scratch = 0
    failures = []
    for start in range(0, len(tests), batch):
        chunk = tests[start:start + batch]
        out = generate(model, [prompt(*p) for p in chunk], tokenizer=tok, max_new_tokens=48, temperature=0.0)
        for p, text in zip(chunk, out.text):
            ok = answer_of(text) == str(result(*p))
            answers += ok
            scratch += text.strip() == completion(*p)
            if not ok and len(failures) < 5:
                failures.append(f"{prompt(*p)}{text}")
    return {"problems": len(tests), "answer_accuracy": answers / len(tests),
            "completion_accuracy": scratch / len(tests), "failures": failures}


def export(model, tok, out_dir: Path, report: dict) -> Path:
    """config.json + model.safetensors (original HF names, bf16 storage) + tokenizer.json + recipe.json."""
    from m1jax.loading import save_pretrained

    # bf16 storage keeps the file small; the config says float32, so loading upcasts and computes in fp32.
    save_pretrained(model, out_dir, tokenizer=tok, storage_dtype="bfloat16")
    (out_dir / "recipe.json").write_text(json.dumps(report, indent=1) + "\n")
    return out_dir


def load_recipe_config(path: Path, overrides: list[str]):
    """(Task, TrainConfig) from the recipe's YAML: a `task` section plus the training sections."""
    from train.config import TrainConfig, apply_overrides

    d = apply_overrides(yaml.safe_load(path.read_text()), overrides)
    task = Task(**d.pop("task", {}))
    return task, TrainConfig.from_dict(d, str(path))


# ---- the recipe ----------------------------------------------------------------------------------
def run_recipe(config_path: Path, out: Path, overrides: list[str] = (), eval_problems: int | None = None) -> dict:
    import jax

    from m1jax.model import abstract_model, with_params
    from train.loop import train

    t0 = time.perf_counter()
    task, tcfg = load_recipe_config(config_path, list(overrides))
    tok = build_tokenizer(task)
    data_dir = prepare_data(task, tok, out / "data")
    tcfg = tcfg.replace(data={"path": str(data_dir)}, run={"dir": str(out / "run")},
                        model={"overrides": {**tcfg.model.overrides, "vocab_size": tok.vocab_size,
                                             "eos_token_id": tok.eos_token_id}})
    result = train(tcfg)
    train_s = time.perf_counter() - t0
    config = tcfg.model_config()
    model = with_params(abstract_model(config), jax.tree.map(np.asarray, result.state.params))
    metrics = evaluate(model, tok, task, eval_problems)
    report = {"task": dataclasses.asdict(task), "steps": result.step, "train_wall_s": round(train_s, 1),
              "total_wall_s": round(time.perf_counter() - t0, 1), **metrics,
              "train_config": tcfg.to_dict()}
    export(model, tok, out / "model", report)
    return report


def install(model_dir: Path) -> Path:
    """Copy an exported model into the package as the default model."""
    import m1jax.default_model

    target = Path(m1jax.default_model.__file__).parent
    for name in SHIPPED_FILES:
        shutil.copy2(model_dir / name, target / name)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m1jax train recipe arithmetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs/arithmetic"))
    parser.add_argument("--install", action="store_true", help="copy the result into m1jax/default_model/")
    parser.add_argument("overrides", nargs="*", help="section.key=value changes, e.g. run.steps=100 task.seed=1")
    args = parser.parse_args(argv)
    report = run_recipe(args.config, args.out, args.overrides)
    print(f"held-out answer accuracy {report['answer_accuracy']:.3f} (full completion "
          f"{report['completion_accuracy']:.3f}) on {report['problems']} problems; {report['steps']} steps; "
          f"wall {report['total_wall_s']} s (training {report['train_wall_s']} s); model in {args.out / 'model'}")
    for f in report["failures"]:
        print("  wrong:", f)
    if args.install:
        print(f"installed into {install(args.out / 'model')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
