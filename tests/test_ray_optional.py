"""Ray stays optional: the core never imports it, a missing extra gives a clear error, and the
pieces of the scale-out that need no cluster (options, search spaces, settings files) check
their inputs. Runs with or without Ray installed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_core_and_cli_do_not_import_ray():
    code = (
        "import sys\n"
        "import ctflow, ctflow.cli, ctflow.tasks.series, ctflow.distributed\n"
        "import ctflow.distributed.slices, ctflow.distributed.cases, ctflow.distributed.tune\n"
        "import ctflow.distributed.throughput\n"
        "import benchmarks.runner, benchmarks.suites.tuning\n"
        "p = ctflow.cli.build_parser()\n"
        "p.parse_args(['reconstruct-dicom', 'a', 'b', '--ray', 'auto'])\n"
        "for argv in (['--help'], ['tune', '--help'], ['reconstruct-dicom', '--help']):\n"
        "    try:\n"
        "        ctflow.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "print('no ray')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("no ray")
    assert "--ray [ADDRESS]" in proc.stdout and "SEARCH" in proc.stdout


def test_missing_ray_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from ctflow.cli import main
    from ctflow.distributed import RayOptions, connect, ray_slice_mapper

    monkeypatch.setitem(sys.modules, "ray", None)          # "import ray" now fails
    with pytest.raises(ImportError, match=r"pip install 'ctflow\[ray\]'"):
        with connect(RayOptions()):
            pass
    with pytest.raises(ImportError, match=r"pip install 'ctflow\[ray\]'"):
        ray_slice_mapper(True)                             # refused when it is built
    with pytest.raises(ValueError, match="map_slices=None"):
        ray_slice_mapper(None)
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((REPO / "ctflow" / "data" / "samples" / "chest-subset").glob("*.dcm"))[:1]:
        (src / f.name).write_bytes(f.read_bytes())
    rc = main(["reconstruct-dicom", str(src), str(tmp_path / "out"), "--method", "fbp",
               "--prior", "none", "--size", "16", "--views", "8", "--quiet", "--ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "ctflow[ray]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()                 # refused before anything is written
    with pytest.raises(ImportError, match="ctflow"):
        from benchmarks.runner import run_suite
        run_suite("ct-sparse", quick=True, out=tmp_path / "b", ray=True)


def test_ray_options_and_addresses():
    from ctflow.distributed import RayOptions, as_ray_options

    assert as_ray_options(None) is None and as_ray_options(False) is None
    assert as_ray_options(True) == RayOptions()
    assert as_ray_options("local").address is None and as_ray_options("local").label == "local"
    assert as_ray_options("auto").address == "auto"
    assert as_ray_options({"max_retries": 1}).max_retries == 1
    for bad in ({"max_retries": -1}, {"threads": 0}, {"num_cpus": 0}, {"task_hook": 3},
                {"gpus_per_task": -1}):
        with pytest.raises(ValueError):
            RayOptions(**bad)
    with pytest.raises(ValueError, match="empty"):
        as_ray_options("  ")


def test_search_space_checks():
    from ctflow.distributed.tune import check_space

    ok = {"rho": {"loguniform": [10, 1e4]}, "lam": {"uniform": [0.0, 2.0]},
          "K": {"choice": [4, 8]}, "sweeps": {"randint": [5, 21]},
          "schedule": {"grid": ["constant", "continuation"]}, "init": "fbp",
          "M": {"value": 2}, "q": {"quniform": [0.0, 1.0, 0.25]}}
    assert check_space(ok) is ok
    bad = [({}, "non-empty"), ({"rho": {"loguniform": [0, 10]}}, "lo > 0"),
           ({"rho": {"uniform": [3, 1]}}, "lo < hi"), ({"K": {"choice": []}}, "non-empty list"),
           ({"K": {"randint": [1.5, 4]}}, "integer bounds"),
           ({"K": {"normal": [0, 1]}}, "exactly one of"), ({"1x": 3}, "valid option name"),
           ({"q": {"quniform": [0, 1, 0]}}, "q > 0"), ({"r": {"uniform": [0]}}, r"\[lo, hi")]
    for space, msg in bad:
        with pytest.raises(ValueError, match=msg):
            check_space(space)


def test_search_and_settings_files(tmp_path):
    from benchmarks.runner import load_settings
    from benchmarks.suites.tuning import load_search

    f = tmp_path / "s.json"
    f.write_text(json.dumps({"method": "msflow", "space": {"rho": {"choice": [1, 2]}}}))
    assert load_search(f)["method"] == "msflow"
    for content, msg in ((["x"], "JSON object"), ({"space": {"a": 1}}, "missing 'method'"),
                         ({"method": "m", "space": {"a": 1}, "typo": 1}, "unknown key"),
                         ({"method": "m", "space": {"a": 1}, "metric": "mse"}, "metric"),
                         ({"method": "m", "space": {"a": 1}, "num_samples": 0}, "num_samples"),
                         ({"method": "m", "space": {"a": {"uniform": [2, 1]}}}, "lo < hi")):
        f.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=msg):
            load_search(f)
    with pytest.raises(FileNotFoundError, match="search file not found"):
        load_search(tmp_path / "none.json")
    # settings: tune's output and the config-like form
    f.write_text(json.dumps({"msflow": {"chosen": {"rho": 50.0}, "psnr": 30.0}}))
    assert load_settings(f) == {"msflow": {"rho": 50.0}}
    f.write_text(json.dumps({"methods": {"tv": {"weight": 3.0}}}))
    assert load_settings(f) == {"tv": {"weight": 3.0}}
    f.write_text(json.dumps({"msflow": {"psnr": 30.0}}))
    with pytest.raises(ValueError, match="no tuned settings"):
        load_settings(f)


def test_settings_overlay_changes_the_cases_not_the_config(tmp_path):
    from benchmarks.runner import apply_settings
    from benchmarks.suites import ct_sparse
    from benchmarks.suites.common import CONFIG_DIR, SuiteContext

    before = (CONFIG_DIR / "ct-sparse.json").read_bytes()
    f = tmp_path / "tuned.json"
    f.write_text(json.dumps({"msflow": {"chosen": {"rho": 123.0, "lam": 0.5}}}))
    plain = SuiteContext(suite="ct-sparse", quick=True, load_prior=False)
    tuned = SuiteContext(suite="ct-sparse", quick=True, load_prior=False)
    apply_settings(tuned, f)
    a, b = ct_sparse.cases(plain), ct_sparse.cases(tuned)
    assert [c.method for c in a] == [c.method for c in b]
    for x, y in zip(a, b):
        if x.method == "msflow":
            assert (y.options["rho"], y.options["lam"]) == (123.0, 0.5) and x.id != y.id
        else:
            assert x.id == y.id
    assert plain.config_label() != tuned.config_label()
    assert (CONFIG_DIR / "ct-sparse.json").read_bytes() == before
    f.write_text(json.dumps({"nosuch": {"chosen": {"a": 1}}}))
    with pytest.raises(ValueError, match="does not run"):
        apply_settings(SuiteContext(suite="ct-sparse", quick=True, load_prior=False), f)
