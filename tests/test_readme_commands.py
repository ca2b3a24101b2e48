"""The README's command-line examples run as written from an empty folder outside the
repository (sample data by its bundled name), and its Python quickstart runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _cli_block() -> list:
    start = README.index("ctflow demo                                         # -> ctflow-demo.png")
    block = README[start:README.index("```", start)]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _env():
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def test_cli_examples_run_from_an_empty_folder(tmp_path):
    lines = [ln for ln in _cli_block()
             if "ctflow demo" not in ln and "--ray" not in ln]   # demo, Ray: own tests
    assert any("sample:chest-subset" in ln for ln in lines)
    for line in lines:
        p = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{line}\n{p.stderr[-2000:]}"
    for name in ("phantom.npy", "sino.npy", "recon.npy", "recon.png", "slice.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "out").glob("*.dcm"))
    assert not (REPO / "out").exists()


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    start = README.index("```python\nimport torch\nfrom ctflow import load_prior, reconstruct")
    code = README[start + len("```python\n"):README.index("```", start + 10)]
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tensor([" in p.stdout
