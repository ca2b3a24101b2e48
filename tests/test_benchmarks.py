"""The benchmark runner: case ids, the resumable JSON-lines store (kill and restart loses
nothing), the noise convention, tuning choice, the report, and ``--quick`` for every suite."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import report as bench_report  # noqa: E402
from benchmarks import settings  # noqa: E402
from benchmarks.cases import canonical, derived_seed  # noqa: E402
from benchmarks.runner import (Case, ResultStore, StoreLockedError, case_id, main,  # noqa: E402
                               run_cases, run_suite)
from benchmarks.suites import options, problems  # noqa: E402
from benchmarks.suites.grid import choose, grid_points  # noqa: E402
from ctflow.flow import GaussianVelocity  # noqa: E402
from ctflow.priors import FlowPrior  # noqa: E402


# ---------------------------------------------------------------------------------------------
# helpers
def gaussian_ct_prior(size=64):
    """A closed-form Gaussian prior posing as a CT prior (fast; the same benchmark code path)."""
    mu = torch.full((1, size, size), 0.3)
    sigma = torch.full((1, size, size), 0.2)
    return FlowPrior(GaussianVelocity(mu, sigma), image_size=size, scale=1.0, shift=0.0,
                     hu_window=(-1024.0, 1024.0), name="gaussian-test")


@pytest.fixture(scope="module")
def micro_prior_path(tmp_path_factory):
    """A tiny randomly initialised U-Net saved as a checkpoint (loads by path like ct64)."""
    from ctflow.flow import UNet
    from ctflow.priors import save_prior
    torch.manual_seed(0)
    net = UNet(base=4, channel_mults=(1,), num_res_blocks=1, attention_levels=(), num_heads=1,
               groups=1, image_size=64)
    stem = tmp_path_factory.mktemp("prior") / "micro"
    save_prior(FlowPrior(net, image_size=64, hu_window=(-1024.0, 1024.0), name="micro"), stem)
    return str(stem)


def make_cases(n, suite="unit"):
    return [Case(suite, "fake", {"k": i}, {"operator": "none"}, f"img{i % 3}", 0, "p",
                 labels={"i": i}) for i in range(n)]


def fake_execute(case):
    i = case.options["k"]
    return {"metrics": {"psnr": 20.0 + i, "ssim": 0.5}, "nfe": {"forward": i, "backward": 0,
                                                               "total": i},
            "seconds": 0.01 * i, "peak_memory_bytes": 1024 * i, "iterations": 1}


def lines(path):
    return Path(path).read_bytes().split(b"\n")


# ---------------------------------------------------------------------------------------------
# case ids
def test_case_id_is_sha1_of_canonical_json_and_ignores_labels():
    c = Case("s", "msflow", {"b": 1, "a": 2.5}, {"views": 30}, "test/x", 7, "ct64",
             labels={"N": 8})
    key = json.dumps({"suite": "s", "method": "msflow", "options": {"a": 2.5, "b": 1},
                      "problem": {"views": 30}, "image": "test/x", "seed": 7, "prior": "ct64"},
                     sort_keys=True, separators=(",", ":"))
    assert c.id == hashlib.sha1(key.encode()).hexdigest()[:16]
    # key order and labels do not matter; every defining field does
    c2 = Case("s", "msflow", {"a": 2.5, "b": 1}, {"views": 30}, "test/x", 7, "ct64",
              labels={"other": 1})
    assert c2.id == c.id
    for changed in (dict(options={"a": 2.5, "b": 2}), dict(seed=8), dict(image="test/y"),
                    dict(problem={"views": 60}), dict(method="dflow"), dict(prior="other")):
        fields = dict(suite="s", method="msflow", options={"a": 2.5, "b": 1},
                      problem={"views": 30}, image="test/x", seed=7, prior="ct64")
        fields.update(changed)
        assert case_id(**fields) != c.id


# ---------------------------------------------------------------------------------------------
# the store
def test_store_drops_partial_last_line_and_repairs_before_append(tmp_path):
    store = ResultStore(tmp_path / "s.jsonl")
    store.append({"id": "a", "status": "ok", "v": 1})
    store.append({"id": "b", "status": "ok", "v": 2})
    with open(store.path, "ab") as f:                       # a run killed mid-write
        f.write(b'{"id": "c", "status": "ok", "v"')
    assert [r["id"] for r in store.rows()] == ["a", "b"]
    store2 = ResultStore(store.path)
    store2.append({"id": "d", "status": "ok", "v": 4})
    raw = [ln for ln in lines(store.path) if ln]
    assert [json.loads(ln)["id"] for ln in raw] == ["a", "b", "d"]   # every line parses
    assert store.path.read_bytes().endswith(b"\n")
    assert store2.done_ids() == {"a", "b", "d"}


def test_store_first_ok_row_wins_and_errors_are_not_done(tmp_path):
    store = ResultStore(tmp_path / "s.jsonl")
    store.append({"id": "a", "status": "error", "error": "boom"})
    store.append({"id": "a", "status": "ok", "v": 1})
    store.append({"id": "a", "status": "ok", "v": 2})
    assert [r["v"] for r in store.ok_rows()] == [1]
    assert store.done_ids() == {"a"}


def test_store_refuses_a_second_writer(tmp_path):
    store = ResultStore(tmp_path / "s.jsonl")
    with store.locked():
        with pytest.raises(StoreLockedError, match="another benchmark process"):
            with ResultStore(tmp_path / "s.jsonl").locked():
                pass
    with store.locked():                      # released again
        pass


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    cases = make_cases(7)
    store = ResultStore(tmp_path / "unit.jsonl")
    calls = []

    def execute(case):
        calls.append(case.id)
        return fake_execute(case)

    def stop_after(k):
        if k == 3:
            raise KeyboardInterrupt                      # like Ctrl-C after 3 finished cases

    with pytest.raises(KeyboardInterrupt):
        run_cases(cases, execute, store, env={}, after_case=stop_after)
    first = store.ok_rows()
    assert [r["id"] for r in first] == [c.id for c in cases[:3]]
    with open(store.path, "ab") as f:                    # and a torn line from a hard kill
        f.write(b'{"id": "torn"')
    summary = run_cases(cases, execute, store, env={})
    assert (summary.skipped, summary.ran) == (3, 4)
    rows = store.ok_rows()
    assert [r["id"] for r in rows] == [c.id for c in cases]           # all, in order
    assert rows[:3] == first                                         # untouched
    assert len(calls) == 7                                           # nothing ran twice
    assert len([ln for ln in lines(store.path) if ln]) == 7          # no duplicate lines
    for r, c in zip(rows, cases):
        assert r["metrics"]["psnr"] == 20.0 + c.options["k"] and r["labels"] == c.labels


def test_failed_case_is_stored_as_error_and_retried(tmp_path):
    cases = make_cases(3)
    store = ResultStore(tmp_path / "unit.jsonl")

    def flaky(case):
        if case.options["k"] == 1:
            raise FloatingPointError("diverged")
        return fake_execute(case)

    s = run_cases(cases, flaky, store, env={})
    assert s.failed == [cases[1].id]
    err = [r for r in store.rows() if r["status"] == "error"]
    assert len(err) == 1 and "FloatingPointError: diverged" in err[0]["error"]
    s2 = run_cases(cases, fake_execute, store, env={})
    assert (s2.skipped, s2.ran, s2.failed) == (2, 1, [])
    assert {r["id"] for r in store.ok_rows()} == {c.id for c in cases}


def test_duplicate_case_definitions_are_refused(tmp_path):
    c = make_cases(1)
    with pytest.raises(ValueError, match="duplicate case ids"):
        run_cases(c + c, fake_execute, ResultStore(tmp_path / "x.jsonl"), env={})


# ---------------------------------------------------------------------------------------------
# data and noise
def test_relative_noise_convention_and_shared_draws():
    from ctflow.operators import GaussianBlur
    A = GaussianBlur(64, sigma=1.0)
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    clean = A(x)
    noise = {"model": "relative", "level": 0.01}
    y, sigma = problems.measure(A, x, noise, seed=123)
    assert sigma == pytest.approx(0.01 * float(clean.double().norm()) / 64.0, rel=1e-9)
    e = (y - clean).double()
    assert float(e.std()) == pytest.approx(sigma, rel=0.05)           # 4096 draws
    assert float(e.norm() / clean.double().norm()) == pytest.approx(0.01, rel=0.05)
    y2, _ = problems.measure(A, x, noise, seed=123)
    assert torch.equal(y, y2)
    y3, s3 = problems.measure(A, x, {"model": "absolute", "level": 0.05}, seed=123)
    assert s3 == 0.05 and torch.allclose((y3 - clean) / 0.05, (y - clean) / sigma, atol=1e-3)
    # the noise seed depends on (seed, image, problem), never on the method
    p = {"operator": "blur", "sigma": 1.0, "noise": noise}
    assert derived_seed("noise", 0, "test/a", p) == derived_seed(
        "noise", 0, "test/a", dict(reversed(list(p.items()))))
    assert derived_seed("noise", 0, "test/a", p) != derived_seed(
        "noise", 0, "test/b", p)
    with pytest.raises(ValueError, match="noise model"):
        problems.measure(A, x, {"model": "snr", "level": 1}, seed=0)


def test_measurements_are_those_of_the_committed_results():
    """``ctflow.tasks.simulate_measurement`` gives exactly the data the committed results were
    made with: sigma in float64 from the clean data, eps drawn in float64 on the CPU."""
    A = problems.build_operator(problems.ct_problem(30), 64)
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    for noise in ({"model": "relative", "level": 0.01}, {"model": "absolute", "level": 0.05}):
        y, sigma = problems.measure(A, x, noise, seed=42)
        clean = A(x)
        ref = noise["level"] * (float(clean[0].double().norm()) / math.sqrt(clean[0].numel())
                                if noise["model"] == "relative" else 1.0)
        eps = torch.randn(tuple(clean.shape), generator=torch.Generator().manual_seed(42),
                          dtype=torch.float64)
        assert sigma == ref
        assert float((y - (clean + (ref * eps).to(clean.dtype))).abs().max()) == 0.0


def test_prepare_slice_windows_and_resizes_like_training():
    lo, hi = -1000.0, 1000.0
    hu = torch.zeros(128, 96).numpy()                                 # 0 HU: window centre
    hu[:, :10] = -3024.0                                              # scanner padding
    x = problems.prepare_slice(hu, image_size=32, hu_window=(lo, hi))
    assert x.shape == (1, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x[0, 0, 16, 16]) == pytest.approx(0.5, abs=1e-6)     # (0 - lo)/(hi - lo)
    assert float(x[0, 0, 16, 1]) == pytest.approx(0.0, abs=1e-6)      # padded with air


def test_split_ids_are_disjoint_and_sized():
    test_ids = problems.image_ids("test")
    val_ids = problems.image_ids("validation")
    assert len(test_ids) == 10 and len(val_ids) == 4
    pt = {i.split("/")[1].split("_")[0] for i in test_ids}
    pv = {i.split("/")[1].split("_")[0] for i in val_ids}
    assert len(pt) == 5 and len(pv) == 2 and not pt & pv


def test_method_options_split_n_into_segments():
    o = options.method_options("msflow", {"K": 8, "rho": 10.0}, quick=False, steps=32)
    assert (o["K"], o["M"], o["rho"]) == (8, 4, 10.0)
    assert options.method_options("msflow", {"K": 8}, quick=False, steps=4)["K"] == 4
    assert options.method_options("dflow", {}, quick=True, steps=16)["N"] == 16
    with pytest.raises(ValueError, match="not divisible"):
        options.method_options("msflow", {"K": 3}, quick=False, steps=8)


# ---------------------------------------------------------------------------------------------
# tuning and report
def test_grid_points_and_choice():
    pts = grid_points({"rho": [1, 10], "alpha": [0.1, 0.5, 0.9]})
    assert len(pts) == 6 and pts[0] == {"rho": 1, "alpha": 0.1} and pts[-1] == {"rho": 10,
                                                                                "alpha": 0.9}
    rows = []
    for p, vals in ((pts[0], [20, 22]), (pts[1], [25, 23]), (pts[2], [24, 24])):
        for v in vals:
            rows.append({"labels": {"tuned": "m", "point": canonical(p)},
                         "metrics": {"psnr": v, "ssim": 0.5}})
    res = choose(rows, pts, "m")
    assert res["chosen"] == pts[1]          # tie 24 = 24 goes to the earlier point
    assert res["psnr"] == 24 and res["cases"] == 2 and len(res["table"]) == 3
    with pytest.raises(ValueError, match="non-empty list"):
        grid_points({"rho": []})


def _row(i, variant, N, psnr, views=30):
    return {"id": f"r{i}", "status": "ok", "suite": "ct-sparse", "image": f"test/{i % 3}",
            "seed": 0, "labels": {"views": views, "variant": variant, "N": N},
            "metrics": {"psnr": psnr, "ssim": psnr / 100}, "nfe": {"total": 10 * (N or 1)},
            "seconds": 1.0, "peak_memory_bytes": (N or 1) * 2 ** 20, "iterations": 2,
            "timestamp": "2026-01-01T00:00:00+00:00", "device_name": "cpu: test"}


def test_report_aggregates_mean_and_sample_std(tmp_path):
    rows = [_row(0, "MS-Flow", 8, 30.0), _row(1, "MS-Flow", 8, 32.0), _row(2, "MS-Flow", 8, 34.0),
            _row(3, "D-Flow", 8, 29.0), _row(4, "FBP", None, 25.0), _row(5, "MS-Flow", 16, 33.0)]
    recs = bench_report.aggregate(rows, ["views", "variant", "N"])
    ms8 = next(r for r in recs if r["variant"] == "MS-Flow" and r["N"] == 8)
    assert ms8["n"] == 3 and ms8["psnr_mean"] == pytest.approx(32.0)
    assert ms8["psnr_std"] == pytest.approx(2.0)                      # sample std, ddof = 1
    assert ms8["peak_mb_mean"] == pytest.approx(8.0)
    assert next(r for r in recs if r["variant"] == "FBP")["psnr_std"] == 0.0
    store = ResultStore(tmp_path / "ct-sparse.jsonl")
    for r in rows:
        store.append(r)
    written = bench_report.render(tmp_path, suites=["ct-sparse"])
    names = {p.name for p in written}
    assert {"ct-sparse.md", "ct-sparse_quality.png", "ct-sparse_cost.png"} <= names
    md = (tmp_path / "ct-sparse.md").read_text()
    assert "| MS-Flow | 8 | 3 | 32.00 ± 2.00 |" in md
    assert "### 30 views" in md


def test_report_expands_rows_shared_by_ablation_factors():
    row = {"id": "x", "labels": {"factor": "lambda", "value": "on", "variant": "MS-Flow",
                                 "N": 32, "also": [{"factor": "rho", "value": 100.0},
                                                   {"factor": "sweep", "value": "gauss-seidel",
                                                    "K": 8}]}}
    out = bench_report.expand_also([row])
    assert [r["labels"]["factor"] for r in out] == ["lambda", "rho", "sweep"]
    assert out[1]["labels"] == {"factor": "rho", "value": 100.0, "variant": "MS-Flow", "N": 32}
    assert out[2]["labels"]["K"] == 8 and "also" not in out[0]["labels"]


def test_default_output_folder_is_outside_the_source_tree_unless_a_full_run_from_the_root(
        tmp_path):
    assert settings.default_out(False, cwd=REPO) == REPO / "benchmarks" / "results"
    assert settings.default_out(True, cwd=REPO) == REPO / "bench-results" / "quick"
    assert settings.default_out(True, cwd=tmp_path) == tmp_path / "bench-results" / "quick"
    assert settings.default_out(False, cwd=tmp_path) == tmp_path / "bench-results"


def test_suites_run_the_configs_methods_cheap_first_with_registry_labels():
    from benchmarks.suites import ct_sparse
    from benchmarks.suites.common import SuiteContext
    from ctflow.solvers import METHODS

    ctx = SuiteContext(suite="ct-sparse", quick=True, load_prior=False)
    cases = ct_sparse.cases(ctx)
    order = list(dict.fromkeys(c.method for c in cases))
    assert order == ["fbp", "tv", "pnpflow", "otode", "msflow", "dflow"]
    assert set(order) == set(ctx.config()["methods"])
    assert all(c.labels["variant"] == METHODS[c.method].label for c in cases)
    assert {c.labels["N"] for c in cases if options.takes_steps(c.method)} == {8, 16}
    assert options.option_names("msflow") >= {"K", "M", "seed"}
    with pytest.raises(ValueError, match="unknown method"):
        options.run_order(["msflow", "nope"])


# ---------------------------------------------------------------------------------------------
# the suites, --quick, on the real code path
def _have_ct():
    import ctflow.operators as ops
    return hasattr(ops, "ParallelBeam2D") and hasattr(ops, "RayTransform")


@pytest.mark.parametrize("suite", ["ct-sparse", "ablation", "restoration"])
def test_quick_case_suites_run_resume_and_report(tmp_path, suite):
    if suite != "restoration" and not _have_ct():
        pytest.skip("the CT operators (ParallelBeam2D, RayTransform) are not available")
    prior = gaussian_ct_prior()
    s = run_suite(suite, quick=True, out=tmp_path, prior=prior)
    assert s.failed == [] and s.ran == s.total > 0
    rows = ResultStore(tmp_path / f"{suite}.jsonl").ok_rows()
    assert len(rows) == s.total
    for r in rows:
        assert math.isfinite(r["metrics"]["psnr"]) and 0 < r["metrics"]["ssim"] <= 1
        assert r["versions"]["torch"] == torch.__version__ and r["device_name"]
        assert r["quick"] is True and r["prior"] == "gaussian-test" and r["timestamp"]
        assert r["nfe"]["total"] == r["nfe"]["forward"] + r["nfe"]["backward"]
        if r["method"] in ("msflow", "dflow", "pnpflow"):
            assert r["nfe"]["forward"] > 0
    s2 = run_suite(suite, quick=True, out=tmp_path, prior=prior)
    assert (s2.skipped, s2.ran) == (s.total, 0)
    written = bench_report.render(tmp_path, suites=[suite])
    assert any(p.suffix == ".png" for p in written)
    assert (tmp_path / f"{suite}.md").read_text().count("\n|") >= 3


def test_cli_list_and_report(tmp_path, micro_prior_path, capsys):
    assert main(["restoration", "--quick", "--prior", micro_prior_path, "--out", str(tmp_path),
                 "--list"]) == 0
    out = capsys.readouterr().out
    assert "restoration: 8 cases, 0 stored" in out and out.count("pending") == 8
    assert main(["report", "--out", str(tmp_path)]) == 1           # nothing to report yet
    assert main(["nonsense", "--quick"]) == 2
    with pytest.raises(SystemExit):
        main(["ct-sparse", "--seed", "x"])


def test_killed_cli_run_restarts_without_losing_a_case(tmp_path, micro_prior_path):
    """SIGKILL a real `python -m benchmarks` run after a finished case, tear its last line,
    and restart: every finished case is kept once and the rest are run."""
    out = tmp_path / "out"
    total = 5
    if not _have_ct():
        pytest.skip("the CT operators (ParallelBeam2D, RayTransform) are not available")
    # ct-sparse --quick runs FBP, TV, PnP-Flow, OT-ODE, then MS-Flow (N = 8): four quick
    # cases and a slower one, so the kill lands inside the run
    cmd = [sys.executable, "-m", "benchmarks", "ct-sparse", "--quick", "--prior",
           micro_prior_path, "--out", str(out), "--no-progress", "--no-report",
           "--limit", str(total)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    store = ResultStore(out / "ct-sparse.jsonl")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(store.ok_rows()) < 1 and proc.poll() is None:
            time.sleep(0.02)
        assert len(store.ok_rows()) >= 1, proc.stderr.read().decode()[-2000:] \
            if proc.poll() is not None else "no rows in time"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = store.ok_rows()
    assert 1 <= len(before) < total
    with open(store.path, "ab") as f:
        f.write(b'{"suite": "ct-sparse", "id": "tor')           # a torn last line
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(before)} already stored" in done.stdout
    after = store.ok_rows()
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids)) == total
    assert after[:len(before)] == before
    assert all(json.loads(ln) for ln in lines(store.path) if ln)


# the suites owned by other modules: run through the same entry point when present
@pytest.mark.parametrize("suite,module", [("operators", "operators"), ("memory", "memory"),
                                          ("convergence", "convergence"),
                                          ("jacobi", "jacobi")])
def test_quick_external_suites(tmp_path, suite, module):
    if not (REPO / "benchmarks" / f"{module}.py").exists():
        pytest.skip(f"benchmarks/{module}.py is not present yet")
    assert main([suite, "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert any(tmp_path.iterdir())


def test_quick_tuning_leaves_the_config_alone(tmp_path):
    before = (settings.CONFIG_DIR / "ct-sparse.json").read_bytes()
    s = run_suite("ct-sparse", quick=True, out=tmp_path, prior=gaussian_ct_prior(), tune=True)
    assert s.failed == [] and s.ran == s.total == 12         # 6 methods x 2 points x 1 slice
    chosen = json.loads((tmp_path / "tune-ct-sparse.chosen.json").read_text())
    assert set(chosen) == {"msflow", "dflow", "pnpflow", "otode", "tv", "fbp"}
    rows = ResultStore(tmp_path / "tune-ct-sparse.jsonl").ok_rows()
    assert all(r["image"].startswith("validation/") for r in rows)    # never the TEST split
    assert (settings.CONFIG_DIR / "ct-sparse.json").read_bytes() == before


def test_tuning_writes_the_best_validation_point_into_the_config(tmp_path, monkeypatch):
    cfg = json.loads((settings.CONFIG_DIR / "ct-sparse.json").read_text())
    cfg["methods"]["msflow"].update(sweeps=2)
    cfg["tuning"]["grid"] = {"msflow": {"alpha": [0.5, 0.9]},
                             "fbp": {"filter": ["ramp", "hann"]}}
    cfg["tuning"]["problems"] = cfg["tuning"]["problems"][:1]
    cfg["tuning"]["reference_steps"] = 8
    cdir = tmp_path / "configs"
    cdir.mkdir()
    (cdir / "ct-sparse.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(settings, "CONFIG_DIR", cdir)
    s = run_suite("ct-sparse", quick=False, out=tmp_path, prior=gaussian_ct_prior(), tune=True)
    assert s.failed == [] and s.total == 16                 # 4 points x 4 validation slices
    new = json.loads((cdir / "ct-sparse.json").read_text())
    rows = ResultStore(tmp_path / "tune-ct-sparse.jsonl").ok_rows()
    for method, key in (("msflow", "alpha"), ("fbp", "filter")):
        res = new["tuning"]["result"][method]
        means = {}
        for r in rows:
            if r["method"] == method:
                means.setdefault(r["options"][key], []).append(r["metrics"]["psnr"])
        best = max(means, key=lambda v: sum(means[v]) / len(means[v]))
        assert res["chosen"] == {key: best} and new["methods"][method][key] == best
        assert res["psnr"] == pytest.approx(sum(means[best]) / 4) and res["cases"] == 4
        assert len(res["images"]) == 4
    assert new["methods"]["msflow"]["sweeps"] == 2 and "tuned on the validation" in \
        new["tuning"]["status"]


def test_isolated_cases_run_in_fresh_worker_processes(tmp_path, micro_prior_path):
    if not _have_ct():
        pytest.skip("the CT operators (ParallelBeam2D, RayTransform) are not available")
    s = run_suite("ct-sparse", quick=True, out=tmp_path, prior=micro_prior_path, isolate=True,
                  limit=1)
    assert s.failed == [] and s.ran == 1
    rows = ResultStore(tmp_path / "ct-sparse.jsonl").ok_rows()
    assert [r["method"] for r in rows] == ["fbp"] and all(r["isolated"] for r in rows)
    # the same numbers as in-process (same data, same noise draw)
    s2 = run_suite("ct-sparse", quick=True, out=tmp_path / "inproc", prior=micro_prior_path,
                   isolate=False, limit=1)
    rows2 = ResultStore(tmp_path / "inproc" / "ct-sparse.jsonl").ok_rows()
    assert s2.ran == 1 and [r["id"] for r in rows2] == [r["id"] for r in rows]
    for a, b in zip(rows, rows2):
        assert a["metrics"]["psnr"] == pytest.approx(b["metrics"]["psnr"], abs=1e-6)
        assert a["noise_sigma"] == b["noise_sigma"] and not b["isolated"]
    with pytest.raises(ValueError, match="needs the prior as a bundled name"):
        run_suite("ct-sparse", quick=True, out=tmp_path, prior=gaussian_ct_prior(), isolate=True)
