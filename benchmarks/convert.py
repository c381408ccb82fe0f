"""Checkpoint conversion: throughput against `cat` of the same files, and peak memory against the checkpoint.

    python benchmarks/convert.py [--size-gb 2] [--workdir /tmp] [--keep] [--baseline DIR] [--repeat N]

Builds a synthetic checkpoint with M1's proportions (16 layers = 2 cycles of 7 lightning + 1 softmax, 32 experts
that hold ~85% of the bytes, an expert weight the largest stacked parameter, bf16 weights with an fp32 router,
tensors scattered over many shards), then, in one run: hf-to-orbax with a cold page cache (pages dropped with
posix_fadvise) and warm, and orbax-to-hf, each right after a `cat` of its source files in the same cache state
(the disk is shared, so its speed drifts). Each conversion runs as a child process under /usr/bin/time -v for its
peak RSS (Linux). With --baseline DIR (another source tree, e.g. `mkdir DIR && git archive HEAD | tar -x -C DIR`),
its converters run too, each right after this tree's, so that before/after come from one run on the same machine.
Targets: peak RSS <= 1.5 x the largest stacked parameter + 300 MB; throughput >= 50% of the raw read speed.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoints_convert.orbax_to_hf import safetensors_header  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.weights import hf_tensor_specs, param_specs  # noqa: E402

MB = 1e6


def synthetic_config(size_gb: float) -> ModelConfig:
    """M1's shape at a smaller scale: the experts hold most bytes and an expert weight is the largest stacked
    parameter (as in M1: 36 GB of 912 GB); the expert width sets the total size."""
    d, layers, experts = 1024, 16, 32
    alpha = (2 * layers) ** 0.25
    config = lambda width: ModelConfig(
        vocab_size=8192, hidden_size=d, num_layers=layers, num_heads=8, num_kv_heads=2, head_dim=128,
        layer_types=tuple("softmax" if i % 8 == 7 else "lightning" for i in range(layers)),
        intermediate_size=width, num_experts=experts, linear_attn_alpha=alpha, full_attn_alpha=alpha,
        mlp_alpha=alpha, dtype="bfloat16")
    size = lambda width: sum(math.prod(s) * dt.itemsize for s, dt in hf_tensor_specs(config(width)).values())
    per_width = (size(128) - size(64)) / 64  # bytes per unit of expert width; the rest is fixed
    fixed = size(64) - 64 * per_width
    return config(max(64, round((size_gb * 1e9 - fixed) / per_width / 64) * 64))


def write_checkpoint(directory: Path, config: ModelConfig, shard_bytes: float = 50e6) -> int:
    """Random-looking tensors scattered over shards (M1's files each hold pieces of ~35 layers)."""
    import json
    specs = hf_tensor_specs(config)
    total = sum(math.prod(s) * d.itemsize for s, d in specs.values())
    shards = max(4, round(total / shard_bytes))
    names = list(np.random.default_rng(0).permutation(sorted(specs)))
    files = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, 2**27, dtype=np.uint8)  # 128 MB of bit patterns to cut tensors from
    directory.mkdir(parents=True)
    weight_map = {}
    for i, file in enumerate(files):
        entries = [(n, specs[n][0], specs[n][1]) for n in names[i::shards]]
        with open(directory / file, "wb") as f:
            f.write(safetensors_header(entries))
            for name, shape, dtype in entries:
                nbytes = math.prod(shape) * dtype.itemsize
                start = int(rng.integers(0, noise.size - nbytes)) if nbytes < noise.size else 0
                f.write(noise[start:start + nbytes].data if nbytes <= noise.size else np.resize(noise, nbytes).data)
                weight_map[name] = file
            f.flush()
            os.fsync(f.fileno())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf = {**config.to_hf(), "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(hf))
    return total


def drop_cache(directory: Path) -> None:
    """Evict the files' pages from the page cache (only these files; needs no privileges)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_cat(directory: Path) -> float:
    files = sorted(str(p) for p in directory.rglob("*") if p.is_file())
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def peak_rss_run(cmd: list[str], tree: Path = REPO) -> tuple[float, str, float]:
    """(wall seconds, stdout, peak RSS in MB) of a child under /usr/bin/time -v, importing from `tree`. (getrusage
    of a forked child would report at least this process's own RSS: Linux carries the high-water mark across
    fork and exec.)"""
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, proc.stdout, rss_kb / 1024


def run_convert(argv: list[str], tree: Path = REPO) -> tuple[float, float, float]:
    """(wall seconds, the converter's own seconds, peak RSS MB) of `m1jax convert ...` in a child process."""
    wall, out, rss = peak_rss_run([sys.executable, "-m", "checkpoints_convert.cli", *argv, "--no-progress"], tree)
    return wall, float(re.search(r"in ([0-9.]+) s", out).group(1)), rss


def describe(tree: Path) -> str:
    """Which code ran: the git revision of `tree` (+ uncommitted changes), or its path."""
    rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if rev.returncode or Path(rev.stdout.strip()) == tree:
        return f"tree {tree}"
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "checkpoints_convert", "m1jax"],
                           capture_output=True, text=True).stdout.strip()
    return f"{rev.stdout.strip()}{' + changes' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size (default 2)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument("--baseline", type=Path, help="another source tree to run the same conversions with")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each conversion; the best is shown")
    args = parser.parse_args()

    config = synthetic_config(args.size_gb)
    trees = {describe(REPO): REPO}
    if args.baseline:
        trees[f"baseline: {describe(args.baseline.resolve())}"] = args.baseline.resolve()
    root = Path(tempfile.mkdtemp(prefix="m1jax-convert-bench-", dir=args.workdir))
    try:
        src = root / "hf"
        total = write_checkpoint(src, config)
        largest = max(math.prod(s.shape) * (4 if s.is_router else 2) for s in param_specs(config))
        shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic checkpoint: {total / MB:,.0f} MB in {shards} shards, {config.num_layers} layers, "
              f"{config.num_experts} experts x {config.intermediate_size}; largest stacked parameter "
              f"{largest / MB:,.0f} MB; CPUs: {os.cpu_count()}\n")

        runs: dict[tuple[str, str], list] = {}  # (run, code) -> [((wall, own, rss), seconds of the cat before)]
        for _, label, (i, tree) in itertools.product(range(args.repeat), ("hf-to-orbax, cold cache",
                                                     "hf-to-orbax, warm cache", "orbax-to-hf, warm cache"),
                                                     enumerate(trees.values())):
            dst, out = root / f"ckpt{i}", root / f"out{i}"
            cold, source = "cold" in label, src if label.startswith("hf-to-orbax") else dst
            if cold:
                drop_cache(source)
            cat = time_cat(source)  # right before: the disk is shared and its speed drifts
            if cold:
                drop_cache(source)
            if label.startswith("hf-to-orbax"):
                shutil.rmtree(dst, ignore_errors=True)  # not --overwrite: deleting a checkpoint is not converting
                run = run_convert(["hf-to-orbax", "--src", str(src), "--dst", str(dst)], tree)
            else:
                shutil.rmtree(out, ignore_errors=True)
                run = run_convert(["orbax-to-hf", "--src", str(dst), "--dst", str(out)], tree)
            runs.setdefault((label, list(trees)[i]), []).append((run, cat))
        floor = peak_rss_run([sys.executable, "-c", "import checkpoints_convert.cli"])[2]

        budget = 1.5 * largest / MB + 300
        rate = lambda s: total / MB / s
        print(f"best of {args.repeat} run(s) each (shared machine); peak RSS: the highest of them\n")
        print("| run | code | MB/s (own time) | MB/s (wall, incl. start-up) | cat just before, same cache: MB/s "
              "| vs that cat | peak RSS MB | RSS target |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for (label, code), tries in runs.items():
            (wall, own, _), cat = min(tries, key=lambda t: t[0][1])
            rss = max(run[2] for run, _ in tries)
            verdict = "ok" if rss <= budget else "MISSED"
            print(f"| {label} | {code} | {rate(own):,.0f} | {rate(wall):,.0f} | {rate(cat):,.0f} | {cat / own:.0%} "
                  f"| {rss:,.0f} | <= {budget:,.0f}: {verdict} |")
        print(f"| import only (interpreter + jax + orbax) | {list(trees)[0]} | | | | | {floor:,.0f} | |")
        print(f"\ncheckpoint {total / MB:,.0f} MB; largest stacked parameter {largest / MB:,.0f} MB; "
              f"throughput target: >= 50% of cat with the same cache state")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
