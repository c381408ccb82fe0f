"""Every benchmark script runs to the end on the CPU (its small smoke sizes) with no failed row: run these before
spending device time (`python -m pytest -m slow tests/test_benchmarks.py`, about 4 minutes on 2 cores)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "timing.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_runs_on_cpu(script):
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "| failed" not in output and "Traceback" not in output, output[-3000:]
