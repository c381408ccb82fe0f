"""Every notebook runs top to bottom (in a fresh Python, from the repository root): its code cells as one script,
`!pip install` lines skipped (the test environment has the package) and other `!` lines run as shell commands."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def as_script(notebook: Path) -> str:
    lines = ["import subprocess, sys"]
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for line in "".join(cell["source"]).splitlines():
            if line.startswith("!pip "):
                continue
            if line.startswith("!"):
                command = line[1:].replace("m1jax ", f"{shlex.quote(sys.executable)} -m m1jax.cli ", 1)
                line = f"subprocess.run({command!r}, shell=True, check=True)"
            lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(notebook, tmp_path):
    script = tmp_path / f"{notebook.stem}.py"
    script.write_text(as_script(notebook))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{notebook.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
