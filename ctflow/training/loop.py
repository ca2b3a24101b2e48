r"""The optimisation loop shared by every trainer (flow prior, autoencoder), and its state.

* :class:`EMA` — exponential moving average of the weights,
  :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\theta` with the warm-up
  :math:`d = \min(d_{\max}, (1 + n)/(10 + n))` at step :math:`n`;
* :func:`lr_at` — linear learning-rate warm-up, then constant or cosine decay;
* :func:`training_loop` — steps, gradient clipping, logging to ``loss.jsonl``, checkpoints and
  early stop (SIGINT/SIGTERM in the command line);
* resumable checkpoint state: :func:`training_state`, :func:`restore_training_state`,
  :func:`latest_checkpoint`, :func:`prune_checkpoints`, and the loss log
  (:func:`read_log`, :func:`append_log`, :func:`loss_curve`).

Checkpoints are safetensors + JSON (:mod:`ctflow.priors.checkpoint`; no pickle) named
``ckpt-<step:08d>.safetensors/.json``.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ctflow.data.atomic import atomic_write_bytes
from ctflow.priors.checkpoint import (TRAIN_FORMAT, CheckpointError, read_checkpoint,
                                     write_checkpoint)

__all__ = ["EMA", "lr_at", "training_loop", "LoopEnd", "training_state",
           "restore_training_state", "latest_checkpoint", "prune_checkpoints", "read_log",
           "append_log", "needs_final_checkpoint", "loss_curve"]


class EMA:
    """Exponential moving average of a module's floating-point state (parameters and
    buffers), with the warm-up :math:`d_n = \\min(d, (1 + n)/(10 + n))`."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                s.copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "constant", min_lr_ratio: float = 0.1) -> float:
    """Learning rate at (0-based) ``step``: linear warm-up, then constant or cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / span)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")



# ---------------------------------------------------------------------- optimizer state
def _flatten_optimizer(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                         meta: dict) -> None:
    state: Dict[int, dict] = {}
    for name, v in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = v
    for name, v in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})



# ---------------------------------------------------------------------- loss log
def read_log(path: Path) -> List[dict]:
    """The records of a ``loss.jsonl`` (up to the first line that does not parse)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def loss_curve(log: List[dict], *, max_points: int = 200, last_step: Optional[int] = None
               ) -> List[List[float]]:
    """``[[step, loss], ...]`` of a loss log (records up to ``last_step``), thinned to about
    ``max_points`` points; the last record is always included."""
    if last_step is not None:
        log = [r for r in log if r["step"] <= last_step]
    stride = max(1, math.ceil(len(log) / max_points))
    curve = [[r["step"], round(r["loss"], 5)] for r in log[::stride]]
    if log and curve[-1][0] != log[-1]["step"]:
        curve.append([log[-1]["step"], round(log[-1]["loss"], 5)])
    return curve


# ---------------------------------------------------------------------- checkpoints
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.json$")


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The JSON path of the newest checkpoint in ``out_dir`` that reads back intact
    (header, size and SHA-256 checked), or ``None``."""
    d = Path(out_dir)
    if not d.is_dir():
        return None
    found = sorted(((int(m.group(1)), f) for f in d.iterdir()
                    if (m := _CKPT_RE.match(f.name))), reverse=True)
    for _, f in found:
        try:
            read_checkpoint(f, verify=True)
        except (OSError, CheckpointError):
            continue
        return f
    return None



def prune_checkpoints(out: Path, newest: int, keep_last: int,
                      keep_every: Optional[int]) -> None:
    """Delete the checkpoints in ``out`` except the ``keep_last`` newest, ``newest`` itself
    and (if ``keep_every``) every multiple of ``keep_every``."""
    out = Path(out)
    steps = sorted(int(m.group(1)) for f in out.iterdir() if (m := _CKPT_RE.match(f.name)))
    keep = set(steps[-max(1, keep_last):]) | {newest}
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for s in steps:
        if s not in keep:
            for suf in (".safetensors", ".json"):
                p = out / f"ckpt-{s:08d}{suf}"
                if p.exists():
                    p.unlink()

def _rng_tensor(state: torch.Tensor) -> torch.Tensor:
    return state.detach().clone().to(torch.uint8)


def append_log(log_path: Path, losses: List[dict], rec: dict) -> None:
    """Append one loss record to the in-memory list and to ``loss.jsonl``."""
    losses.append(rec)
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def needs_final_checkpoint(path: Optional[Path], step: int, stopped: bool) -> bool:
    """Whether the run ends without a checkpoint of its last step (or was stopped)."""
    return path is None or int(json.loads(Path(path).read_text())["step"]) != step or stopped


def training_state(model: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                   gen: torch.Generator):
    """The tensors of a resumable training checkpoint (model, EMA, optimiser, both RNG
    states) and the optimiser's layout for its JSON: ``(tensors, optimizer_meta)``."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    ot, ometa = _flatten_optimizer(opt)
    tensors.update(ot)
    tensors["rng.train"] = _rng_tensor(gen.get_state())
    tensors["rng.torch"] = _rng_tensor(torch.get_rng_state())
    return tensors, ometa


def restore_training_state(tensors: Dict[str, torch.Tensor], meta: dict,
                           model: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                           gen: torch.Generator, log_path: Path):
    """Load what :func:`training_state` saved, cut the loss log back to the checkpoint's step;
    returns ``(step, elapsed_seconds, commands)``."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.shadow = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("ema.")}
    _unflatten_optimizer(opt, tensors, meta["optimizer"])
    gen.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])
    step = int(meta["step"])
    logged = [r for r in read_log(log_path) if r.get("step", 0) <= step]
    atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in logged).encode())
    return step, float(meta.get("elapsed_seconds", 0.0)), list(meta.get("commands", []))


def start_or_resume(out: Path, *, resume: bool, config: dict, model: torch.nn.Module,
                    ema: EMA, opt: torch.optim.Optimizer, gen: torch.Generator,
                    command: Optional[str] = None):
    """Start a run in ``out`` or resume it from its newest valid checkpoint (every trainer
    does it this way): the checkpoint's model config must equal ``config``; without a
    checkpoint an old loss log is removed. ``command`` is appended to the run's command
    list. Returns ``(checkpoint or None, step, elapsed_seconds, commands, losses)``."""
    log_path = out / "loss.jsonl"
    ckpt = latest_checkpoint(out) if resume else None
    step, elapsed, commands = 0, 0.0, []
    if ckpt is not None:
        tensors, meta = read_checkpoint(ckpt)
        if meta.get("format") != TRAIN_FORMAT:
            raise CheckpointError(f"{ckpt}: not a training checkpoint")
        if meta.get("model") != config:
            raise ValueError(f"{ckpt}: checkpoint model config {meta.get('model')} differs "
                             f"from the requested {config}; use another out_dir or "
                             "resume=False")
        step, elapsed, commands = restore_training_state(tensors, meta, model, ema, opt, gen,
                                                         log_path)
    elif log_path.exists():
        log_path.unlink()
    if command:
        commands.append(command)
    return ckpt, step, elapsed, commands, read_log(log_path)


def checkpoint_saver(out: Path, *, model: torch.nn.Module, ema: EMA,
                     opt: torch.optim.Optimizer, gen: torch.Generator, meta: dict,
                     keep_last: int, keep_every: Optional[int] = None
                     ) -> Callable[[int, Optional[float], float], Path]:
    """``save(step, last_loss, seconds) -> json path``: writes ``ckpt-<step>`` in ``out``
    (the training state, ``meta`` plus the step, loss, time, optimiser layout and parameter
    count) and prunes older checkpoints (:func:`prune_checkpoints`)."""
    def save(step_now: int, last_loss: Optional[float], seconds: float) -> Path:
        tensors, ometa = training_state(model, ema, opt, gen)
        full = {"format": TRAIN_FORMAT, **meta, "step": int(step_now),
                "elapsed_seconds": float(seconds), "last_loss": last_loss, "optimizer": ometa,
                "parameters": int(sum(p.numel() for p in model.parameters()))}
        path = write_checkpoint(tensors, full, out / f"ckpt-{step_now:08d}")
        prune_checkpoints(out, step_now, keep_last, keep_every)
        return path
    return save


@dataclass
class LoopEnd:
    """Where :func:`training_loop` stopped."""

    step: int
    last_loss: Optional[float]
    seconds: float
    checkpoint: Optional[Path]


def training_loop(*, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA,
                  loss_step: Callable[[], Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
                  lr_of_step: Callable[[int], float], step: int, steps: int, elapsed: float,
                  grad_clip: float, log_every: int, checkpoint_every: int,
                  save: Callable[[int, Optional[float], float], Path], log_path: Path,
                  losses: List[dict], checkpoint: Optional[Path],
                  stop: Optional[Callable[[], bool]], progress: bool, what: str) -> LoopEnd:
    """The optimisation loop of every trainer (flow prior, autoencoder), from ``step`` to
    ``steps``.

    Per step: the learning rate ``lr_of_step(step)``, ``loss, extras = loss_step()`` (the
    trainer draws its batch and noise there, from its own generator), backward, gradient
    clipping at ``grad_clip`` (0: none), the optimiser and EMA updates. Every ``log_every``
    steps (and at the last) the mean loss and the means of ``extras`` since the last record go
    to ``loss.jsonl`` (:func:`append_log`); every ``checkpoint_every`` steps
    ``save(step, last_loss, elapsed_seconds)`` writes a checkpoint, and at the end one more if
    the last step has none (:func:`needs_final_checkpoint`). ``stop()`` returning true ends the
    loop early (SIGINT/SIGTERM in the CLIs); a non-finite loss raises ``FloatingPointError``.
    ``elapsed`` counts training time across resumed runs; checkpoint writing is not counted.
    """
    last_loss = losses[-1]["loss"] if losses else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=min(step, steps), desc=f"train {what}",
                   dynamic_ncols=True)
    acc, acc_extra, acc_n = 0.0, {}, 0
    t_mark = time.perf_counter()
    path, stopped = checkpoint, False
    while step < steps:
        if stop is not None and stop():
            stopped = True
            break
        for g in opt.param_groups:
            g["lr"] = lr_of_step(step)
        loss, extras = loss_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"{what} loss became {lv} at step {step}")
        acc += lv
        for k, v in extras.items():
            acc_extra[k] = acc_extra.get(k, 0.0) + float(v.detach())
        acc_n += 1
        if step % log_every == 0 or step == steps:
            now = time.perf_counter()
            elapsed += now - t_mark
            t_mark = now
            rec = {"step": step, "loss": acc / acc_n,
                   **{k: v / acc_n for k, v in acc_extra.items()},
                   "lr": opt.param_groups[0]["lr"], "seconds": round(elapsed, 3)}
            append_log(log_path, losses, rec)
            last_loss = rec["loss"]
            acc, acc_extra, acc_n = 0.0, {}, 0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}")
        if step % checkpoint_every == 0 and step != steps:
            elapsed += time.perf_counter() - t_mark
            t_mark = time.perf_counter()
            path = save(step, last_loss, elapsed)
    elapsed += time.perf_counter() - t_mark
    if bar is not None:
        bar.close()
    if needs_final_checkpoint(path, step, stopped):
        path = save(step, last_loss, elapsed)
    return LoopEnd(step=step, last_loss=last_loss, seconds=elapsed, checkpoint=path)

