"""End-to-end tests of the ``ctflow`` command line (subprocess calls on tiny inputs)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import REPO, cli, run_cli  # noqa: F401 - cli is a fixture


def assert_user_error(proc, *words):
    """Exit status 2, exactly one line on stderr naming ``words``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("ctflow")
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def disk_image(n: int) -> np.ndarray:
    """A disk of value 0.8 (radius 0.6) with a smaller disk of 0.3 inside, on [-1, 1]^2."""
    c = (np.arange(n) + 0.5) / n * 2 - 1
    xx, yy = np.meshgrid(c, -c)
    img = np.where(xx ** 2 + yy ** 2 < 0.6 ** 2, 0.8, 0.0)
    img = np.where((xx - 0.2) ** 2 + yy ** 2 < 0.2 ** 2, 0.3, img)
    return img.astype(np.float32)


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


# ---------------------------------------------------------------------- help, info
def test_help_lists_commands_and_examples(capsys):
    from ctflow.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "reconstruct", "reconstruct-dicom", "train", "bench", "info"):
        assert cmd in out
    assert "examples:" in out
    assert main([]) == 2  # no command: the help and a non-zero status


@pytest.mark.parametrize("cmd", ["demo", "reconstruct", "reconstruct-dicom", "info"])
def test_subcommand_help(cmd, capsys):
    from ctflow.cli import main

    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--device" in out and "--threads" in out


def test_threads_option_sets_torch_threads_for_the_command(cli):
    """``--threads N`` (before or after the command) is torch.set_num_threads(N); the
    default leaves torch's setting; N < 1 is a one-line user error."""
    before = torch.get_num_threads()
    try:
        for args in (("--threads", "3", "info", "--json"), ("info", "--threads", "2", "--json")):
            proc = cli(*args)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout)["torch_threads"] == int(args[args.index("--threads")
                                                                         + 1])
        torch.set_num_threads(before)
        proc = cli("info", "--json")
        assert json.loads(proc.stdout)["torch_threads"] == before
        assert_user_error(cli("--threads", "0", "info"), "--threads")
    finally:
        torch.set_num_threads(before)


def test_info_text_and_json(cli):
    proc = cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "CT backends" in proc.stdout and "CUDA" in proc.stdout
    proc = cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["torch"] == torch.__version__
    assert data["cuda"]["available"] == torch.cuda.is_available()
    assert set(data["extras"]) >= {"odl", "astra", "tomosipo", "medmnist", "ray"}
    names = [b["name"] for b in data["ct_backends"]["backends"]]
    assert data["ct_backends"]["error"] or "torch" in " ".join(names)


# ---------------------------------------------------------------------- reconstruct
def test_reconstruct_image_npy_h5_png(tmp_path, cli):
    n = 24
    img = disk_image(n)
    src = tmp_path / "img.npy"
    np.save(src, img)
    # .npy output: TV on a simulated 30-view measurement is close to the disk image.
    out = tmp_path / "rec.npy"
    proc = run_cli("--quiet", "reconstruct", src, "-o", out, "--method", "tv", "--prior",
                   "none", "--views", "30", "--noise-rel", "0.01", "--option", "iterations=150")
    assert proc.returncode == 0, proc.stderr
    rec = np.load(out)
    assert rec.shape == (n, n) and rec.dtype == np.float32
    assert 0 <= rec.min() and rec.max() <= 1
    assert psnr(rec, img) > 20.0
    assert "PSNR" in proc.stdout
    # .h5 output holds the reconstruction, the measurement and the ground truth.
    import h5py
    out_h5 = tmp_path / "rec.h5"
    proc = cli("--quiet", "reconstruct", src, "-o", out_h5, "--method", "fbp", "--prior",
                   "none", "--views", "30")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out_h5) as f:
        assert f["reconstruction"].shape == (n, n)
        assert f["measurement"].shape[0] == 30
        np.testing.assert_allclose(f["ground_truth"][()], img, atol=1e-5)
        assert f.attrs["method"] == "fbp" and int(f.attrs["views"]) == 30
        metrics = json.loads(f.attrs["metrics"])
        assert abs(metrics[0]["psnr"] - psnr(f["reconstruction"][()], img)) < 1e-3
    # .png output: 8-bit image of the reconstruction's size.
    out_png = tmp_path / "rec.png"
    proc = cli("--quiet", "reconstruct", src, "-o", out_png, "--method", "fbp",
                   "--prior", "none", "--views", "30")
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image as mpimg
    png = mpimg.imread(out_png)
    assert png.shape[:2] == (n, n)
    # An existing output is not replaced without --overwrite.
    proc = cli("reconstruct", src, "-o", out_png, "--method", "fbp", "--prior", "none")
    assert_user_error(proc, "exists")


def test_reconstruct_sinogram(tmp_path, cli):
    from ctflow.tasks import make_ct_operator

    n, views = 24, 40
    img = disk_image(n)
    A = make_ct_operator(n, views)
    sino = A(torch.from_numpy(img)[None, None])[0, 0].numpy()
    assert sino.shape[0] == views and sino.shape[1] != n  # auto-detected as a sinogram
    src = tmp_path / "sino.npy"
    np.save(src, sino)
    out = tmp_path / "rec.h5"
    proc = cli("--quiet", "reconstruct", src, "-o", out, "--method", "tv", "--prior",
               "none", "--noise-rel", "0.001", "--option", "iterations=200")
    assert proc.returncode == 0, proc.stderr
    import h5py
    with h5py.File(out) as f:
        assert f.attrs["kind"] == "sinogram" and int(f.attrs["size"]) == n
        np.testing.assert_allclose(f["measurement"][()], sino, rtol=1e-6)
        rec = f["reconstruction"][()]
        assert "ground_truth" not in f
    assert psnr(rec, img) > 22.0
    # A sinogram whose detector count matches no geometry at the requested size is refused.
    proc = cli("reconstruct", src, "-o", tmp_path / "x.npy", "--method", "fbp", "--prior",
               "none", "--size", "40")
    assert_user_error(proc, "does not match")


# ---------------------------------------------------------------------- errors
def test_error_missing_file(tmp_path, cli):
    proc = cli("reconstruct", tmp_path / "nope.npy", "-o", tmp_path / "r.npy",
               "--method", "fbp")
    assert_user_error(proc, "not found", "nope.npy")
    proc = cli("reconstruct-dicom", tmp_path / "nope", tmp_path / "out", "--method", "fbp")
    assert_user_error(proc, "not found", "nope")
    assert not (tmp_path / "out").exists()


def test_error_unreadable_dicom_subprocess(tmp_path):
    """The real process: exit status 2, one line, no traceback; --debug adds the traceback."""
    bad = tmp_path / "bad.dcm"
    bad.write_text("this is not a DICOM file\n")
    proc = run_cli("reconstruct", bad, "-o", tmp_path / "r.npy", "--method", "fbp")
    assert_user_error(proc, "bad.dcm", "DICOM")
    proc = run_cli("--debug", "reconstruct", bad, "-o", tmp_path / "r.npy", "--method", "fbp")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert not (tmp_path / "r.npy").exists()


def test_error_unreadable_dicom_folder(tmp_path, cli):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "slice.dcm").write_text("not DICOM either")
    proc = cli("reconstruct-dicom", folder, tmp_path / "out", "--method", "fbp")
    assert_user_error(proc, "slice.dcm")
    proc = cli("--debug", "reconstruct-dicom", folder, tmp_path / "out", "--method", "fbp")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_error_unknown_method(tmp_path, cli):
    src = tmp_path / "img.npy"
    np.save(src, disk_image(16))
    proc = cli("reconstruct", src, "-o", tmp_path / "r.npy", "--method", "magic")
    assert_user_error(proc, "invalid choice", "magic", "msflow", "landweber")
    proc = cli("reconstruct-dicom", tmp_path, tmp_path / "o", "--method", "magic")
    assert_user_error(proc, "invalid choice", "magic")
    proc = cli("demo", "--methods", "fbp,magic", "--out", tmp_path / "d.png")
    assert_user_error(proc, "magic")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_cuda_requested_but_absent(tmp_path, cli):
    src = tmp_path / "img.npy"
    np.save(src, disk_image(16))
    proc = cli("--device", "cuda", "reconstruct", src, "-o", tmp_path / "r.npy",
               "--method", "fbp")
    assert_user_error(proc, "CUDA", "--device cpu")
    proc = cli("demo", "--device", "cuda", "--out", tmp_path / "d.png")
    assert_user_error(proc, "CUDA")
    assert not (tmp_path / "d.png").exists()
    proc = cli("reconstruct-dicom", tmp_path, tmp_path / "o", "--device", "cuda:0")
    assert_user_error(proc, "CUDA")


def test_error_prior_not_found(tmp_path, cli):
    src = tmp_path / "img.npy"
    np.save(src, disk_image(16))
    proc = cli("reconstruct", src, "-o", tmp_path / "r.npy", "--method", "msflow",
               "--prior", tmp_path / "missing-prior")
    assert_user_error(proc, "missing-prior")
    assert not (tmp_path / "r.npy").exists()
    proc = cli("reconstruct", src, "-o", tmp_path / "r.npy", "--method", "msflow",
               "--prior", "no-such-bundled-prior")
    assert_user_error(proc, "no-such-bundled-prior")


def test_error_bad_image_range(tmp_path, cli):
    src = tmp_path / "hu.npy"
    np.save(src, disk_image(16) * 1000 - 1000)
    proc = cli("reconstruct", src, "-o", tmp_path / "r.npy", "--method", "fbp",
               "--prior", "none")
    assert_user_error(proc, "--hu-window")


def test_parse_helpers():
    from ctflow.cli import CLIError, parse_options, parse_slices

    assert parse_slices("2:5") == slice(2, 5)
    assert parse_slices(":3") == slice(None, 3)
    assert parse_slices("4") == slice(4, 5)
    assert parse_slices(None) is None
    with pytest.raises(CLIError):
        parse_slices("a:b")
    assert parse_options(["sweeps=20", "rho=1e2", "init=fbp", "flag=true", "K=[1,2]"]) == {
        "sweeps": 20, "rho": 100.0, "init": "fbp", "flag": True, "K": [1, 2]}
    with pytest.raises(CLIError):
        parse_options(["novalue"])


# ---------------------------------------------------------------------- train, bench
def test_train(tmp_path, cli, capsys):
    from ctflow.cli import main

    for argv in (["train", "--help"], ["train", "ellipses", "--help"],
                 ["train", "latent-flow", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: ctflow train" in out
    assert "--autoencoder" in out and "--device" in out
    # no trainer: a one-line usage error
    assert_user_error(cli("train"), "required")
    # A two-step training run on 16x16 ellipses writes a checkpoint that loads as a prior.
    out = tmp_path / "run"
    proc = run_cli("--device", "cpu", "train", "ellipses", "--count", "4", "--out", out,
                   "--steps", "2",
                   "--batch-size", "2", "--image-size", "16", "--base", "8",
                   "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-levels", "",
                   "--checkpoint-every", "2", "--log-every", "1")
    assert proc.returncode == 0, proc.stderr
    ckpts = sorted(out.glob("ckpt-*.json"))
    assert ckpts
    from ctflow.priors.registry import load_prior
    prior = load_prior(ckpts[-1])
    assert prior.image_size == 16
    # CUDA requested but absent is checked before the trainer starts.
    if not torch.cuda.is_available():
        proc = cli("train", "ellipses", "--out", tmp_path / "r2", "--steps", "1",
                   "--device", "cuda")
        assert_user_error(proc, "CUDA")
        assert not (tmp_path / "r2").exists()
        proc = cli("bench", "ct-sparse", "--quick", "--device=cuda", "--out", tmp_path / "b")
        assert_user_error(proc, "CUDA")


def test_bench_delegates(tmp_path, cli):
    proc = cli("bench", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in (proc.stdout + proc.stderr).lower()
    # One real case of the quick CT suite; the global --quiet reaches the runner.
    proc = run_cli("--quiet", "bench", "ct-sparse", "--quick", "--limit", "1", "--out",
                   tmp_path, "--no-report")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "ct-sparse.jsonl").read_text().splitlines()
            if ln.strip()]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert "psnr" in rows[0]["metrics"] and "--no-progress" in rows[0]["command"]


def test_bench_outside_a_checkout_is_a_clear_error(tmp_path, cli, monkeypatch):
    import ctflow.cli.bench as bench_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_mod, "__file__",
                        str(tmp_path / "site" / "ctflow" / "cli" / "bench.py"))
    proc = cli("bench", "--help")
    assert_user_error(proc, "benchmarks/", "repository")


def test_reconstruct_dicom_file_input_is_prepared_like_the_prior(tmp_path, cli):
    """A DICOM input is windowed and resized exactly as reconstruct-dicom and the prior's
    training data prepare a slice (the stored ground truth is that image)."""
    import h5py

    from ctflow.data import read_dicom_slices
    from ctflow.tasks import to_working_size

    src = REPO / "ctflow" / "data" / "samples" / "chest-subset" / "1-31.dcm"
    out = tmp_path / "r.h5"
    proc = cli("--quiet", "reconstruct", src, "-o", out, "--method", "fbp", "--prior", "none",
               "--hu-window", "-1000", "1000", "--size", "32", "--views", "40")
    assert proc.returncode == 0, proc.stderr
    (sl,) = read_dicom_slices([src])
    expected = to_working_size(np.clip(sl.hu, -1024, 3071), 32, hu_window=(-1000, 1000))
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["ground_truth"][()], expected.numpy(), atol=1e-6)
        assert f["reconstruction"].shape == (32, 32)
        assert json.loads(f.attrs["hu_window"]) == [-1000.0, 1000.0]


# ---------------------------------------------------------------------- registry, noise
def _actions(parser, dest):
    return [a for a in parser._actions if a.dest == dest]


def _subparsers(parser):
    import argparse
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_method_choices_are_the_registry():
    """Every ``--method`` of a solver command offers exactly the registered methods."""
    from ctflow.cli import build_parser
    from ctflow.solvers.registry import method_names

    commands = _subparsers(build_parser())
    for name in ("reconstruct", "reconstruct-dicom", "throughput"):
        (action,) = _actions(commands[name], "method")
        assert tuple(action.choices) == method_names(), name
    assert "landweber" in method_names()


def test_classical_methods_get_no_default_prior(tmp_path, cli):
    """A method that needs no prior never gets one by default (landweber once got ct64);
    ``--noise-rel 0`` / ``--sigma 0`` work for it."""
    import h5py

    from ctflow.cli.common import default_prior
    from ctflow.solvers.registry import METHODS

    for name, spec in METHODS.items():
        assert default_prior(name, None) == ("ct64" if spec.needs_prior else None), name
    assert default_prior("msflow", "none") is None
    n = 16
    src = tmp_path / "img.npy"
    np.save(src, disk_image(n))
    for noise in (("--noise-rel", "0"), ("--sigma", "0")):
        out = tmp_path / f"lw{noise[0]}.h5"
        proc = cli("--quiet", "reconstruct", src, "-o", out, "--method", "landweber",
                   "--views", "20", *noise, "--option", "iterations=5")
        assert proc.returncode == 0, proc.stderr
        with h5py.File(out) as f:
            assert f.attrs["prior"] == "" and int(f.attrs["size"]) == n
            assert json.loads(f.attrs["metrics"])[0]["sigma"] == 0.0
            np.testing.assert_allclose(f["measurement"][()].std() > 0, True)


def test_noise_options(tmp_path, cli):
    """--sigma and --noise-rel: exclusive; --noise-level is gone (the error names the new
    options); zero noise is a clear error for the flow methods, before any work starts."""
    import h5py

    src = tmp_path / "img.npy"
    np.save(src, disk_image(16))
    out = tmp_path / "r.h5"
    assert_user_error(cli("reconstruct", src, "-o", out, "--noise-level", "0.01"),
                      "--noise-level", "--noise-rel", "--sigma")
    assert_user_error(cli("reconstruct", src, "-o", out, "--sigma", "1", "--noise-rel", "0.1"),
                      "not allowed")
    for method in ("msflow", "dflow"):
        proc = cli("reconstruct", src, "-o", out, "--method", method, "--noise-rel", "0")
        assert_user_error(proc, "--noise-rel", method, "fbp")
        proc = cli("reconstruct-dicom", tmp_path / "nope", tmp_path / "o", "--method", method,
                   "--sigma", "0")
        assert_user_error(proc, "--sigma", method)
    assert not out.exists() and not (tmp_path / "o").exists()
    assert_user_error(cli("reconstruct", src, "-o", out, "--method", "fbp", "--sigma", "-1"),
                      "--sigma")
    # an absolute sigma is the noise standard deviation itself (FBP of a 30-view simulation)
    proc = cli("--quiet", "reconstruct", src, "-o", out, "--method", "fbp", "--views", "30",
               "--sigma", "0.25")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        assert json.loads(f.attrs["noise"]) == {"model": "gaussian", "sigma": 0.25}
        assert json.loads(f.attrs["metrics"])[0]["sigma"] == 0.25


def test_sinogram_relative_noise_is_relative_to_the_measurement(tmp_path, cli):
    """For a measured sinogram --noise-rel ETA gives sigma = ETA * RMS(y)."""
    import h5py

    from ctflow.tasks import make_ct_operator

    A = make_ct_operator(16, 20)
    sino = A(torch.from_numpy(disk_image(16))[None, None])[0, 0].numpy()
    src = tmp_path / "sino.npy"
    np.save(src, sino)
    out = tmp_path / "r.h5"
    proc = cli("--quiet", "reconstruct", src, "-o", out, "--method", "fbp", "--noise-rel",
               "0.05")
    assert proc.returncode == 0, proc.stderr
    rms = float(np.sqrt(np.mean(sino.astype(np.float64) ** 2)))
    with h5py.File(out) as f:
        sigma = json.loads(f.attrs["metrics"])[0]["sigma"]
    assert sigma == pytest.approx(0.05 * rms, rel=1e-5)


def test_bench_results_default_to_the_working_directory(tmp_path, monkeypatch, cli):
    """Without --out the runner chooses (benchmarks.settings.default_out: the current
    directory unless a full run starts in the repository root); --out is passed on."""
    import ctflow.cli.bench as bench_mod

    seen = []
    monkeypatch.setattr(bench_mod, "_runner", lambda what: seen.append)
    monkeypatch.chdir(tmp_path)
    assert cli("bench", "ct-sparse", "--quick", "--limit", "1").returncode == 0
    assert "--out" not in seen[-1]
    from benchmarks.settings import default_out
    assert default_out(True) == tmp_path / "bench-results" / "quick"
    assert default_out(False) == tmp_path / "bench-results"
    assert cli("bench", "report", "--out", "elsewhere").returncode == 0
    assert seen[-1] == ["report", "--out", "elsewhere"]


def test_every_parser_is_in_the_cli():
    """The library modules of ctflow hold no argument parser and no sys.argv."""
    import ast

    root = REPO / "ctflow"
    offenders = []
    for path in root.rglob("*.py"):
        if path.is_relative_to(root / "cli"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = (node.attr if isinstance(node, ast.Attribute) else
                    node.id if isinstance(node, ast.Name) else None)
            if name in ("ArgumentParser", "argv"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_throughput_and_evaluate_prior_commands(tmp_path, cli, capsys):
    from ctflow.cli import main

    for cmd in ("throughput", "evaluate-prior"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "examples:" in capsys.readouterr().out
    out = tmp_path / "w1.json"
    proc = cli("evaluate-prior", "ct64", "--n", "2", "--steps", "1", "--ode-method", "euler",
               "--json", out)
    assert proc.returncode == 0, proc.stderr
    numbers = json.loads(out.read_text())
    assert numbers["prior"] == "ct64" and numbers["n_samples"] == 2
    assert numbers["w1_prior"] >= 0 and numbers["w1_ellipses"] > 0
    assert json.loads(proc.stdout) == numbers
