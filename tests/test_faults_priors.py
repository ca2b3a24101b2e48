"""Fault injection, priors (issue 18, "Bad inputs that hurt"): implausible or tampered prior
descriptions are refused before anything is built, naming the file and the value; the
command line exits 2 and writes nothing. Also: a prior's recommended settings."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from ctflow.priors import CheckpointError, list_priors, load_prior, save_prior
from ctflow.priors.registry import bundled_dir

from helpers import cli  # noqa: F401 - fixture


def _copy_ct64(tmp_path, edit=None, name="p"):
    """A copy of the bundled ct64 prior whose JSON ``edit(meta)`` changed (weights intact)."""
    meta = json.loads((bundled_dir() / "ct64.json").read_text())
    shutil.copy(bundled_dir() / "ct64.safetensors", tmp_path / f"{name}.safetensors")
    meta["weights"] = f"{name}.safetensors"
    if edit is not None:
        edit(meta)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(meta, indent=2) if not isinstance(meta, str) else meta)
    return path


def _set(key, value, part=None):
    def edit(meta):
        (meta[part] if part else meta)[key] = value
    return edit


BAD = [
    ("num_res_blocks", _set("num_res_blocks", 10_000_000, "model"), "num_res_blocks"),
    ("image_size_huge", _set("image_size", 1_000_000), "image_size"),
    ("model_image_size_huge", _set("image_size", 1_000_000, "model"), "image_size"),
    ("base", _set("base", 65536, "model"), "base"),
    ("image_size_str", _set("image_size", "abc"), "image_size"),
    ("scale_nan", _set("scale", float("nan")), "scale"),
    ("scale_zero", _set("scale", 0.0), "scale"),
    ("shift_inf", _set("shift", float("inf")), "shift"),
    ("hu_window", _set("hu_window", [100, -100]), "hu_window"),
    ("channel_mults", _set("channel_mults", [1, 2, 1000], "model"), "channel_mults"),
    ("bigger_than_weights", _set("base", 512, "model"), "parameters"),
]


@pytest.mark.parametrize("case,edit,word", BAD, ids=[b[0] for b in BAD])
def test_bad_description_refused_before_building(tmp_path, case, edit, word):
    path = _copy_ct64(tmp_path, edit)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_prior(path)
    assert time.perf_counter() - t0 < 10      # nothing was built
    assert str(path) in str(err.value) and word in str(err.value)


def test_deeply_nested_description(tmp_path):
    path = _copy_ct64(tmp_path)
    meta = path.read_text()
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text(meta[:-1].rstrip().rstrip("}") + f', "junk": {deep}}}')
    with pytest.raises(CheckpointError, match="nested") as err:
        load_prior(path)
    assert str(path) in str(err.value)


def test_checksum_always_written_verified_and_required(tmp_path):
    for meta in (json.loads((bundled_dir() / f"{n}.json").read_text()) for n in list_priors()):
        assert len(meta["sha256"]) == 64
    # save_prior records the hash.
    prior = load_prior("ct64")
    stem = tmp_path / "saved"
    save_prior(prior, stem)
    assert len(json.loads(stem.with_suffix(".json").read_text())["sha256"]) == 64
    assert load_prior(stem.with_suffix(".json")).image_size == 64
    # Altered weights with a hash: refused.
    blob = bytearray(stem.with_suffix(".safetensors").read_bytes())
    blob[-1] ^= 0xFF
    stem.with_suffix(".safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_prior(stem.with_suffix(".json"))
    # No hash: refused unless the caller opts in.
    path = _copy_ct64(tmp_path, lambda m: m.pop("sha256"), name="nohash")
    with pytest.raises(CheckpointError, match="allow_unverified") as err:
        load_prior(path)
    assert str(path) in str(err.value)
    assert load_prior(path, allow_unverified=True).image_size == 64


def test_cli_refuses_bad_prior_and_writes_nothing(tmp_path, cli):
    path = _copy_ct64(tmp_path, _set("scale", float("nan")))
    src = tmp_path / "img.npy"
    yy, xx = np.mgrid[:64, :64]
    np.save(src, ((yy - 32) ** 2 + (xx - 32) ** 2 < 400).astype(np.float32))
    out = tmp_path / "r.npy"
    res = cli("--quiet", "reconstruct", src, "-o", out, "--method", "msflow", "--prior", path)
    assert res.returncode == 2 and str(path) in res.stderr and "scale" in res.stderr
    assert not out.exists()


def test_nan_reconstruction_is_not_written(tmp_path, cli, monkeypatch):
    import ctflow.cli.reconstruct as rec

    real = rec.run_solver

    def nan_solver(*a, **k):
        res = real(*a, **k)
        res.image = torch.full_like(res.image, float("nan"))
        return res

    monkeypatch.setattr(rec, "run_solver", nan_solver)
    src = tmp_path / "img.npy"
    np.save(src, np.zeros((32, 32), np.float32))
    for suffix in (".npy", ".png", ".h5"):
        out = tmp_path / f"r{suffix}"
        res = cli("--quiet", "reconstruct", src, "-o", out, "--method", "fbp")
        assert res.returncode == 2 and "NaN" in res.stderr, res.stderr
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.npy"]


# ------------------------------------------------------------------ recommended settings
def test_ct64_recommends_the_tuned_demo_settings():
    from ctflow.tasks import DEMO_SETTINGS
    from ctflow.priors.recommended import choose_options, recommended_options

    prior = load_prior("ct64")
    for method, opts in DEMO_SETTINGS.items():
        assert recommended_options(prior, method) == opts
        assert recommended_options(prior, method, task="ct-sparse") == opts
    run, note = choose_options(prior, "msflow", {"seed": 3})
    assert run == {**DEMO_SETTINGS["msflow"], "seed": 3} and note["preset"] == "recommended"
    run, note = choose_options(prior, "msflow", {"K": 2})
    assert run == {"K": 2} and note["preset"] == "explicit"
    run, note = choose_options(prior, "msflow", {}, preset="paper")
    assert run == {} and note["preset"] == "paper"
    with pytest.raises(ValueError, match="preset"):
        choose_options(prior, "msflow", {}, preset="fast")
    with pytest.raises(ValueError, match="task"):
        recommended_options(prior, "msflow", task="ct-limited")


def test_reconstruct_uses_and_reports_the_recommendation():
    import ctflow
    from ctflow.tasks import make_ct_operator

    prior = load_prior("ct64")
    A = make_ct_operator(64, 20)
    y = A(torch.rand(1, 1, 64, 64))
    res = ctflow.reconstruct(y, A, prior, method="tv", sigma=0.01)
    assert res.options["weight"] == 0.07 and res.options["preset"]["preset"] == "recommended"
    res = ctflow.reconstruct(y, A, prior, method="tv", sigma=0.01, weight=0.2)
    assert res.options["weight"] == 0.2 and res.options["preset"]["preset"] == "explicit"
    res = ctflow.reconstruct(y, A, prior, method="tv", sigma=0.01, preset="paper")
    assert res.options["weight"] != 0.07 and res.options["preset"]["preset"] == "paper"
