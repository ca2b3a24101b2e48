"""The compact resumable training state (ctflow.training.resumable): export, import, resume."""
from __future__ import annotations

import json

import pytest
import torch

from ctflow.flow import UNet
from ctflow.priors.checkpoint import read_checkpoint
from ctflow.training.datasets import ImageTensorDataset
from ctflow.training.prior import train_prior
from ctflow.training.resumable import export_state, import_state


def _train(out, steps, **kw):
    data = ImageTensorDataset(torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    model = UNet(base=8, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
                 norm="channel", image_size=None)
    return train_prior(data, out_dir=out, steps=steps, batch_size=4, warmup_steps=2,
                       checkpoint_every=2, log_every=1, model=model, **kw)


def test_export_import_resume(tmp_path):
    a = tmp_path / "a"
    _train(a, 4)
    stem = tmp_path / "state" / "run"
    path = export_state(a, stem)
    tensors, meta = read_checkpoint(path)
    assert meta["step"] == 4 and meta["compact_state"]
    assert not any(k.startswith("optim.") for k in tensors)
    assert {v.dtype for k, v in tensors.items() if not k.startswith("rng.")} == {torch.float16}
    full, full_meta = read_checkpoint(a / "ckpt-00000004.json")
    for k, v in tensors.items():
        if k.startswith("ema."):
            assert torch.allclose(v.float(), full[k], rtol=1e-3, atol=1e-4)
    log = (tmp_path / "state" / "run.loss.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [1, 2, 3, 4]

    b = tmp_path / "b"
    ckpt = import_state(stem, b)
    assert ckpt.name == "ckpt-00000004.json"
    with pytest.raises(FileExistsError, match="already has ckpt-00000004.json"):
        import_state(stem, b)
    res = _train(b, 6)                      # resumes at step 4 with a fresh AdamW state
    assert res.step == 6
    assert [r["step"] for r in res.losses] == [1, 2, 3, 4, 5, 6]
    _, m = read_checkpoint(res.checkpoint)
    assert m["step"] == 6 and m["elapsed_seconds"] >= full_meta["elapsed_seconds"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.losses)


def test_import_refuses_a_full_checkpoint(tmp_path):
    _train(tmp_path / "a", 2)
    with pytest.raises(ValueError, match="not a compact training state"):
        import_state(tmp_path / "a" / "ckpt-00000002", tmp_path / "b")
