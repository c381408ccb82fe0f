"""Checkpoint conversion: throughput against `cat` of the same files, and peak memory against the checkpoint.

    python benchmarks/convert.py [--size-gb 2] [--workdir /tmp] [--keep]

Builds a synthetic checkpoint with M1's proportions (16 layers = 2 cycles of 7 lightning + 1 softmax, 32 experts
that hold ~85% of the bytes, an expert weight the largest stacked parameter, bf16 weights with an fp32 router,
tensors scattered over many shards), then, in one
run: `cat` of the shards with a cold page cache (pages dropped with posix_fadvise) and warm; hf-to-orbax cold and
warm; orbax-to-hf. Each conversion runs as a child process under /usr/bin/time -v for its peak RSS (Linux).
Targets: peak RSS <= 1.5 x the largest stacked parameter + 300 MB; throughput >= 50% of the raw read speed.
"""

from __future__ import annotations

import argparse
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
    files = sorted(str(p) for p in directory.glob("*.safetensors"))
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def peak_rss_run(cmd: list[str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, peak RSS in MB) of a child under /usr/bin/time -v. (getrusage of a forked child
    would report at least this process's own RSS: Linux carries the high-water mark across fork and exec.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, proc.stdout, rss_kb / 1024


def run_convert(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, the converter's own seconds, peak RSS MB) of `m1jax convert ...` in a child process."""
    wall, out, rss = peak_rss_run([sys.executable, "-m", "checkpoints_convert.cli", *argv, "--no-progress"])
    return wall, float(re.search(r"in ([0-9.]+) s", out).group(1)), rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size (default 2)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = parser.parse_args()

    config = synthetic_config(args.size_gb)
    root = Path(tempfile.mkdtemp(prefix="m1jax-convert-bench-", dir=args.workdir))
    try:
        src, dst, out = root / "hf", root / "ckpt", root / "out"
        total = write_checkpoint(src, config)
        largest = max(math.prod(s.shape) * (4 if s.is_router else 2) for s in param_specs(config))
        shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic checkpoint: {total / MB:,.0f} MB in {shards} shards, {config.num_layers} layers, "
              f"{config.num_experts} experts x {config.intermediate_size}; largest stacked parameter "
              f"{largest / MB:,.0f} MB; CPUs: {os.cpu_count()}\n")

        drop_cache(src)
        cat_cold = time_cat(src)
        cat_warm = time_cat(src)
        drop_cache(src)
        cold = run_convert(["hf-to-orbax", "--src", str(src), "--dst", str(dst)])
        warm = run_convert(["hf-to-orbax", "--src", str(src), "--dst", str(dst), "--overwrite"])
        export = run_convert(["orbax-to-hf", "--src", str(dst), "--dst", str(out)])
        floor = peak_rss_run([sys.executable, "-c", "import checkpoints_convert.cli"])[2]

        budget = 1.5 * largest / MB + 300
        rate = lambda s: total / MB / s
        print("| run | MB/s (own time) | MB/s (wall, incl. start-up) | vs cat, same cache | peak RSS MB | RSS target |")
        print("|---|---:|---:|---:|---:|---|")
        print(f"| cat, cold cache | {rate(cat_cold):,.0f} | | 100% | | |")
        print(f"| cat, warm cache | {rate(cat_warm):,.0f} | | 100% | | |")
        for label, (wall, own, rss), cat in (("hf-to-orbax, cold cache", cold, cat_cold),
                                            ("hf-to-orbax, warm cache", warm, cat_warm),
                                            ("orbax-to-hf, warm cache", export, cat_warm)):
            verdict = "ok" if rss <= budget else "MISSED"
            print(f"| {label} | {rate(own):,.0f} | {rate(wall):,.0f} | {cat / own:.0%} | {rss:,.0f} | "
                  f"<= {budget:,.0f}: {verdict} |")
        print(f"| import only (interpreter + jax + orbax) | | | | {floor:,.0f} | |")
        print(f"\ncheckpoint {total / MB:,.0f} MB; largest stacked parameter {largest / MB:,.0f} MB; "
              f"throughput target: >= 50% of cat with the same cache state")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
