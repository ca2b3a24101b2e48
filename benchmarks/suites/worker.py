r"""Run one case in a fresh Python process (``--isolate``, the default for full CPU runs).

Why: on the CPU the solvers measure peak memory as the increase of the process's resident-set
high-water mark during the solve. In a long-lived process the allocator keeps freed pages, so a
later solve reuses them and its increase reads (close to) zero. A fresh process per case makes
every measurement start from the same state (interpreter, ctflow, the prior's weights and the
prepared image loaded; nothing solved yet), at the cost of a few seconds of start-up per case,
which is not part of the reported solver time.

Protocol: ``python -m benchmarks.suites.worker REQUEST.json RESULT.json``; the request holds
the context (suite, quick, device, seed, prior name/path) and the case; the worker writes the
row's result fields (or the error) to the result file. On Linux the worker asks the kernel to
kill it when the parent dies, so a killed benchmark run leaves no orphan solving on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

from ctflow.data import atomic_write_json

from benchmarks.cases import Case, case_from_dict, case_to_dict
from benchmarks.settings import REPO_ROOT

__all__ = ["isolated_execute", "main"]


def _die_with_parent() -> None:
    """In the worker: get SIGKILL when the parent dies (Linux); exit if it already has."""
    parent = os.environ.get("CTFLOW_BENCH_PARENT")
    if sys.platform == "linux":
        try:
            import ctypes
            import signal
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent is not None and str(os.getppid()) != parent:
        os._exit(3)


def isolated_execute(ctx_spec: Dict[str, Any], case: Case, *, timeout: float = None) -> dict:
    """Execute ``case`` in a fresh process; returns the row's result fields or raises
    ``RuntimeError`` with the worker's error message."""
    with tempfile.TemporaryDirectory(prefix="ctflow-bench-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        atomic_write_json(req, {"ctx": ctx_spec, "case": case_to_dict(case)}, default=None)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                              if env.get("PYTHONPATH") else "")
        env["CTFLOW_BENCH_PARENT"] = str(os.getpid())
        proc = subprocess.run([sys.executable, "-m", "benchmarks.suites.worker", str(req),
                               str(res)], cwd=str(REPO_ROOT), env=env, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not res.exists():
            tail = (proc.stderr or "")[-2000:]
            raise RuntimeError(f"benchmark worker exited with code {proc.returncode} without a "
                               f"result; stderr tail:\n{tail}")
        out = json.loads(res.read_text())
    if "error" in out:
        raise RuntimeError(f"(in worker) {out['error']}\n{out.get('traceback', '')}")
    out["result"]["isolated"] = True
    return out["result"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m benchmarks.suites.worker REQUEST.json RESULT.json",
              file=sys.stderr)
        return 2
    _die_with_parent()
    if os.environ.get("CTFLOW_BENCH_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["CTFLOW_BENCH_THREADS"]))
    req_path, res_path = Path(argv[0]), Path(argv[1])
    req = json.loads(req_path.read_text())
    try:
        from benchmarks.suites.common import SuiteContext

        c = req["ctx"]
        ctx = SuiteContext(suite=c["suite"], quick=c["quick"], device=c["device"],
                           seed=c["seed"], prior=c["prior"], progress=False)
        case = case_from_dict(req["case"])
        ctx.problem(case.image, case.problem)          # data ready before the solve
        out = {"result": ctx.execute(case)}
    except Exception as exc:  # reported to the parent, which stores an error row
        import traceback
        out = {"error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(limit=6)}
    atomic_write_json(res_path, out, default=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
