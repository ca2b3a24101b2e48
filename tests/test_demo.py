"""The offline demo: ``ctflow demo --quick`` end to end, and :func:`ctflow.tasks.demo.run_demo`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_cli_writes_figure_and_table(tmp_path):
    out = tmp_path / "demo.png"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "ctflow", "--quiet", "demo", "--quick",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and out.stat().st_size > 10_000
    import matplotlib.image as mpimg
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[1] > img.shape[0]  # a wide grid of panels
    for label in ("FBP", "TV", "PSNR", "SSIM", "NFE"):
        assert label in proc.stdout
    assert "10.7937/TCIA.BBAG-2923" in proc.stdout  # the data citation is printed


def test_run_demo_rows_are_consistent(tmp_path):
    from ctflow.tasks.demo import DEMO_SLICE, run_demo
    from ctflow.data import TEST_PATIENTS

    assert DEMO_SLICE.split("_")[0] in TEST_PATIENTS  # never a training/validation slice
    res = run_demo(out=tmp_path / "d.png", device="cpu", quick=True, progress=False,
                   methods=["fbp", "tv"], verbose=False)
    assert [r["method"] for r in res["rows"]] == ["fbp", "tv"]
    for r in res["rows"]:
        assert r["image"].shape == (64, 64)
        assert 10.0 < r["psnr"] < 60.0 and 0.0 < r["ssim"] <= 1.0
        assert r["seconds"] >= 0
    # Deterministic: same seed, same numbers.
    res2 = run_demo(out=tmp_path / "e.png", device="cpu", quick=True, progress=False,
                    methods=["fbp"], verbose=False)
    assert res2["rows"][0]["psnr"] == res["rows"][0]["psnr"]
    with pytest.raises(ValueError, match="unknown demo method"):
        run_demo(out=tmp_path / "f.png", methods=["nope"], verbose=False)
