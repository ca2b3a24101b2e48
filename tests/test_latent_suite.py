"""The ``latent`` benchmark suite's pieces that decide its numbers: the 64×64 discretisations
of the 128×128 problems, and the acceptance checks on memory and quality rows."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.suites.latent_memory import memory_acceptance  # noqa: E402
from benchmarks.suites.latent_problem import task_operator  # noqa: E402
from benchmarks.suites.latent_quality import quality_summary, timing_summary  # noqa: E402


def test_64_discretisation_sees_the_same_measurements():
    ct = {"operator": "parallel-beam", "views": 12, "noise": 0.01}
    A128, A64 = task_operator(ct, 128), task_operator(ct, 64)
    assert A128.range_shape == A64.range_shape
    # a smooth image gives (nearly) the same line integrals at both resolutions
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128),
                            indexing="ij")
    x = torch.exp(-4 * (xx ** 2 + yy ** 2)).reshape(1, 1, 128, 128)
    y128, y64 = A128(x), A64(F.avg_pool2d(x, 2))
    assert float((y128 - y64).norm() / y128.norm()) < 0.02
    # x4 average pooling at 128 is x2 pooling of the x2-pooled image, exactly
    sr = {"operator": "superres", "factor": 4, "noise": 0.01}
    S128, S64 = task_operator(sr, 128), task_operator(sr, 64)
    z = torch.rand(2, 1, 128, 128)
    assert torch.allclose(S128(z), S64(F.avg_pool2d(z, 2)), atol=1e-6)


def test_memory_acceptance():
    def rows(jf, ex, df):
        out = []
        for s, vals in (("latent-msflow-jf", jf), ("latent-msflow-exact", ex),
                        ("latent-dflow", df)):
            out += [{"solver": s, "N": n, "peak_memory_bytes": v}
                    for n, v in zip((8, 16, 128), vals)]
        return out
    ok = memory_acceptance(rows((100, 104, 109), (200, 190, 215), (10, 20, 160)))
    assert ok["latent-msflow-jf_within_1.1x"] is True
    assert ok["latent-msflow-exact_within_1.1x"] is True
    assert ok["latent-dflow_grows_with_N"] is True
    bad = memory_acceptance(rows((100, 104, 111), (200, 250, 300), (10, 9, 160)))
    assert bad["latent-msflow-jf_within_1.1x"] is False
    assert bad["latent-dflow_grows_with_N"] is False


def test_quality_summary_means_and_checks():
    rows = [{"task": "t", "method": m, "image": i, "psnr": p, "ssim": 0.5, "seconds": s,
             "nfe": 10}
            for m, i, p, s in (("latent-msflow", "a", 30, 10), ("latent-msflow", "b", 32, 20),
                               ("tv", "a", 29, 1), ("tv", "b", 30, 1),
                               ("latent-dflow", "a", 31, 50), ("latent-dflow", "b", 31, 70))]
    out = quality_summary(rows)
    assert out["means"]["t"]["latent-msflow"]["psnr"] == pytest.approx(31.0)
    assert out["means"]["t"]["latent-dflow"]["seconds"] == pytest.approx(60.0)
    acc = out["acceptance"]
    assert acc["t: latent-msflow beats tv"] is True
    assert acc["t: latent-msflow >= latent-dflow (PSNR)"] is True
    assert acc["t: latent-msflow wall time <= latent-dflow"] is True


def test_timing_summary_is_the_median_ratio():
    rows = [{"task": "t", "method": "latent-msflow", "seconds": s} for s in (2.0, 3.0, 50.0)]
    rows += [{"task": "t", "method": "latent-dflow", "seconds": s} for s in (9.0, 12.0, 10.0)]
    out = timing_summary(rows)["t"]
    assert out["latent-msflow"] == 3.0 and out["latent-dflow"] == 10.0
    assert out["dflow_over_msflow"] == pytest.approx(10.0 / 3.0)
