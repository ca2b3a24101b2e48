"""One method registry: the API, the CLI and the DICOM task accept exactly its names, and
every registered method runs through ``ctflow reconstruct`` and ``reconstruct-dicom``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctflow.cli import build_parser, main
from ctflow.data import sample_path
from ctflow.operators.noise import GaussianNoise
from ctflow.solvers.registry import METHODS, method, method_names

#: Tiny settings per method (a smoke run of each; the solvers' own tests check the maths).
TINY = {
    "msflow": dict(K=2, M=1, sweeps=1),
    "dflow": dict(N=2, iterations=1, max_iter=1),
    "pnpflow": dict(steps=2),
    "otode": dict(steps=2),
    "flowdp": dict(rounds=1),
    "fbp": {},
    "tv": dict(iterations=5),
    "cgls": dict(iterations=3),
    "landweber": dict(iterations=3),
}


def _options(name):
    return [a for k, v in TINY[name].items() for a in ("--option", f"{k}={json.dumps(v)}")]


def test_every_registered_method_has_tiny_settings_and_options_type():
    assert set(TINY) == set(METHODS)
    for name, m in METHODS.items():
        opts = m.options_type(**TINY[name])      # the options dataclass accepts them
        assert m.solver_class()(opts).options == opts


def _choices(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    p = sub.choices[command]
    (act,) = [a for a in p._actions if "--method" in a.option_strings]
    return tuple(act.choices)


def test_api_cli_and_dicom_task_accept_exactly_the_registered_names(tmp_path):
    names = method_names()
    assert _choices("reconstruct") == names
    assert _choices("reconstruct-dicom") == names
    from ctflow.solvers import reconstruct
    from ctflow.tasks import reconstruct_dicom
    A = torch.nn.Identity()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        reconstruct(torch.zeros(4), A, None, method="nope")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        reconstruct_dicom(sample_path("chest-subset"), tmp_path / "out", method="nope")
    assert not (tmp_path / "out").exists()
    assert main(["reconstruct", "x.npy", "-o", "y.npy", "--method", "nope"]) == 2
    assert method("MSFlow") is METHODS["msflow"]
    assert set(method_names(needs_prior=False)) == {"fbp", "tv", "cgls", "landweber"}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_through_both_commands(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prior = ["--prior", "ct64"] if method(name).needs_prior else []
    rc = main(["--quiet", "--threads", "1", "reconstruct",
               "sample:ct-heldout/A098752_19001231-32.dcm", "-o", "r.npy", "--method", name,
               "--views", "20", "--size", "64", *prior, *_options(name)])
    assert rc == 0
    img = np.load(tmp_path / "r.npy")
    assert img.shape == (64, 64) and np.isfinite(img).all()
    rc = main(["--quiet", "--threads", "1", "reconstruct-dicom", "sample:chest-subset", "out",
               "--slices", "0:1", "--method", name, "--views", "20", "--size", "64", *prior,
               *_options(name)])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["settings"]["method"] == name
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 1


def test_noise_zero_works_for_methods_without_sigma_and_is_refused_for_flows(tmp_path):
    from ctflow.tasks import check_noise
    zero = GaussianNoise(relative=0.0)
    for name in method_names(needs_prior=False):
        assert check_noise(name, zero) == zero
    for name in method_names(needs_prior=True):
        with pytest.raises(ValueError, match="noise standard deviation > 0"):
            check_noise(name, zero)
