r"""Running cases: the row each finished case gets, in process or from any source of outcomes.

:func:`run_cases` runs every case not yet stored with ``status == "ok"`` and appends one row
per finished case (failed cases become ``status == "error"`` rows and are retried by the next
run); where the cases run is a parameter (``outcomes``: in this process by default, Ray tasks
with :func:`benchmarks.suites.remote.ray_outcomes`).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from benchmarks.cases import Case
from benchmarks.store import ResultStore

__all__ = ["environment", "now", "RunSummary", "Outcome", "in_process", "run_cases"]


# ---------------------------------------------------------------------------------------------
# environment
def environment(device: str) -> dict:
    """Versions and the device name recorded in every row."""
    import numpy
    import torch
    try:
        import ctflow
        ctv = getattr(ctflow, "__version__", "unknown")
    except ImportError:  # pragma: no cover - the runner needs ctflow anyway
        ctv = "missing"
    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(dev))
    else:
        name = platform.processor() or platform.machine() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu: {name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {
        "versions": {"ctflow": ctv, "torch": torch.__version__, "numpy": numpy.__version__,
                     "python": platform.python_version()},
        "device": dev,
        "device_name": name,
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# running cases
@dataclass
class RunSummary:
    """What :func:`run_cases` did."""

    total: int = 0
    skipped: int = 0
    ran: int = 0
    failed: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self, name: str) -> str:
        return (f"{name}: {self.total} cases, {self.skipped} already stored, {self.ran} run, "
                f"{len(self.failed)} failed, {self.seconds:.1f} s")


Outcome = Tuple[Case, Optional[dict], Optional[BaseException], Optional[str]]


def in_process(execute: Callable[[Case], dict]) -> Callable[[Sequence[Case]], Iterator[Outcome]]:
    """The default way to run cases: one after the other in this process. Returns a function
    that maps the pending cases to ``(case, result, None, None)`` or ``(case, None, error,
    traceback)`` in order."""
    def outcomes(pending: Sequence[Case]) -> Iterator[Outcome]:
        for case in pending:
            try:
                result = execute(case)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a failing case must not stop the others
                yield case, None, exc, traceback.format_exc(limit=6)
                continue
            yield case, result, None, None
    return outcomes


def run_cases(cases: Sequence[Case], execute: Optional[Callable[[Case], dict]],
              store: ResultStore, *, env: dict, extra: Optional[dict] = None,
              progress: bool = False, after_case: Optional[Callable[[int], None]] = None,
              outcomes: Optional[Callable[[Sequence[Case]], Iterator[Outcome]]] = None
              ) -> RunSummary:
    """Run every case of ``cases`` not yet in ``store``; append one row per finished case.

    ``execute(case)`` returns the measured part of the row (metrics, nfe, seconds, ...); this
    function adds the case fields, ``env`` and ``extra``, the status and a timestamp. A case that
    raises is stored with ``status="error"`` and the message (and retried by the next run);
    ``KeyboardInterrupt`` stops the run without a row for the case in flight.
    ``after_case(k)`` is called after the k-th appended row (used by tests).
    ``outcomes`` replaces the in-process loop over ``execute``: it maps the pending cases to
    ``(case, result, error, traceback)`` in any order (:func:`ray_outcomes` runs them as Ray
    tasks); each case's row is appended once, as its outcome arrives.
    """
    if outcomes is None:
        if execute is None:
            raise ValueError("run_cases needs execute or outcomes")
        outcomes = in_process(execute)
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate case ids in the suite definition: {dup[:5]}")
    summary = RunSummary(total=len(cases))
    t0 = time.perf_counter()
    with store.locked():
        done = store.done_ids()
        pending = [c for c in cases if c.id not in done]
        summary.skipped = len(cases) - len(pending)
        bar = None
        if progress and pending:
            from tqdm import tqdm
            bar = tqdm(total=len(pending), desc=store.path.stem, unit="case")
        written = set()
        for case, result, error, tb in outcomes(pending):
            if case.id in written:          # never two rows for one case
                continue
            written.add(case.id)
            row = {"suite": case.suite, "id": case.id, "method": case.method,
                   "options": case.options, "problem": case.problem, "image": case.image,
                   "seed": case.seed, "prior": case.prior, "labels": case.labels}
            if error is None:
                row.update(result)
                row["status"] = "ok"
            else:
                row["status"] = "error"
                row["error"] = f"{type(error).__name__}: {error}"
                row["traceback"] = tb or "".join(traceback.format_exception(
                    type(error), error, error.__traceback__, limit=6))
                summary.failed.append(case.id)
            row.update(env)
            if extra:
                row.update(extra)
            row["timestamp"] = now()
            store.append(row)
            summary.ran += 1
            if bar is not None:
                bar.update(1)
            if after_case is not None:
                after_case(summary.ran)
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
