r"""The benchmark runner: cases, the JSON-lines result store, and the command line.

A *case* is one solve: a suite, a method with its options, a problem (operator and noise), one
image and a seed. Its id is a stable hash of exactly these fields,

.. math:: \mathrm{id} = \mathrm{sha1}\big(\mathrm{json}(\text{suite, method, options, problem,
          image, seed})\big)[:16],

with sorted keys and fixed separators, so the same case has the same id in every process and on
every machine, and a change of any option makes a new case.

Every finished case appends one JSON line to ``<out>/<suite>.jsonl`` right away (open, append,
flush, ``fsync``). A killed run therefore leaves at most one partial last line; the reader drops
undecodable lines and the writer cuts a partial tail before it appends. A rerun skips every case
whose id is already stored with ``status == "ok"``; failed cases (``status == "error"``) are
retried. Only one process may write a store at a time (an exclusive ``flock`` on
``<suite>.jsonl.lock``).

With ``--ray [ADDRESS]`` the pending cases run as Ray tasks (:mod:`ctflow.distributed.cases`;
one CPU each, a GPU each when the cluster has GPUs and ``--device`` is not ``cpu``, one torch
thread per task). This process stays the only writer: it appends each case's row as its task
finishes (completion order), so the store holds every case exactly once, with the same fields
and numbers as an in-process run (same seeds); a task whose worker dies is re-run by Ray.

``--settings FILE`` runs a case suite with tuned options from ``FILE`` laid over
``configs/<suite>.json`` (``methods``): the file ``tune`` writes (``{method: {"chosen": {...},
...}}``) or a config-like ``{"methods": {method: {...}}}``.

Command line (also ``ctflow bench``, which calls :func:`main`)::

    python -m benchmarks <suite> [--quick] [--device cpu|cuda] [--out DIR] [--seed S]
                                 [--ray [ADDRESS]] [--settings FILE]
    python -m benchmarks tune <suite> [--quick] ...     # hyper-parameters on the VALIDATION split
    python -m benchmarks tune [<suite>] --search FILE [--ray [ADDRESS]] ...   # Ray Tune search
    python -m benchmarks report [--out DIR]

Suites: ``operators``, ``memory``, ``convergence``, ``jacobi``, ``latent`` (modules with
``run(quick, out, device)``), ``ct-sparse``, ``ablation``, ``restoration`` (case suites run
here), and ``all``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import errno
import fcntl
import hashlib
import importlib
import json
import os
import platform
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "Case", "case_id", "ResultStore", "SUITES", "CASE_SUITES", "EXTERNAL_SUITES",
    "DEFAULT_OUT", "environment", "run_cases", "run_suite", "main", "in_process",
    "ray_outcomes", "execute_case_task", "case_to_dict", "case_from_dict", "load_settings",
    "apply_settings", "REPO_ROOT",
]

#: Where results go by default (``--quick`` runs go to ``<DEFAULT_OUT>/quick``).
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: The repository root (holds ``benchmarks/``); Ray tasks put it on ``sys.path``.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Suites whose cases run through :func:`run_cases` (module under ``benchmarks.suites``).
CASE_SUITES = {
    "ct-sparse": "benchmarks.suites.ct_sparse",
    "ablation": "benchmarks.suites.ablation",
    "restoration": "benchmarks.suites.restoration",
}
#: Suites owned by other modules, each exposing ``run(quick: bool, out: Path, device: str)``.
EXTERNAL_SUITES = {
    "operators": "benchmarks.operators",
    "memory": "benchmarks.memory",
    "convergence": "benchmarks.convergence",
    "jacobi": "benchmarks.jacobi",
    "latent": "benchmarks.suites.latent",
}
#: Every suite, in the order ``all`` runs them.
SUITES = ("operators", "memory", "convergence", "jacobi", "ct-sparse", "ablation",
          "restoration", "latent")


# ---------------------------------------------------------------------------------------------
# cases
def _canonical(obj: Any) -> str:
    """Canonical JSON text (sorted keys, no spaces); floats keep their ``repr``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def case_id(suite: str, method: str, options: dict, problem: dict, image: str, seed: int,
            prior: str = "") -> str:
    """Stable 16-hex-digit id of a case (sha1 of the canonical JSON of its defining fields)."""
    key = _canonical({"suite": suite, "method": method, "options": options, "problem": problem,
                      "image": image, "seed": int(seed), "prior": str(prior)})
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Case:
    """One solve of a benchmark suite.

    Attributes:
        suite: the suite name (``"ct-sparse"``, ...).
        method: the solver method passed to ``ctflow.reconstruct``.
        options: the solver options (JSON-serialisable), passed as ``**options``.
        problem: the forward problem (operator kind and parameters, noise model and level).
        image: the image id (``<split>/<patient>/<file>``).
        seed: the base seed; the noise draw depends on (seed, image, problem) only, never on
            the method, so every method sees the same data.
        prior: the prior's name or checkpoint path (part of the id: results of another prior
            are other cases; a retrained prior under the same name needs a fresh ``--out``).
        labels: how the report groups the case (e.g. ``{"views": 30, "N": 8}``); not part of
            the id (they are derived from the fields above).
        trace: store a per-iteration trace (objective, stitching gap) in the row.
    """

    suite: str
    method: str
    options: Dict[str, Any]
    problem: Dict[str, Any]
    image: str
    seed: int
    prior: str = ""
    labels: Dict[str, Any] = field(default_factory=dict)
    trace: bool = False

    @property
    def id(self) -> str:
        return case_id(self.suite, self.method, self.options, self.problem, self.image,
                       self.seed, self.prior)


# ---------------------------------------------------------------------------------------------
# the store
class StoreLockedError(RuntimeError):
    """Another process is writing the same result store."""


class ResultStore:
    """Append-only JSON-lines store of finished cases, one file per suite.

    Reading tolerates a partial (killed) last line and drops it; :meth:`append` first cuts such
    a tail, then writes one complete line and ``fsync``\\ s, so a finished case is on disk before
    the next one starts.
    """

    def __init__(self, path):
        self.path = Path(path)

    # reading ---------------------------------------------------------------------------------
    def rows(self) -> List[dict]:
        """Every decodable row in file order (a partial or corrupt line is dropped, with a
        warning unless it is the last line)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        out: List[dict] = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                last = i == len(lines) - 1 or all(not r.strip() for r in lines[i + 1:])
                if not last:
                    warnings.warn(f"{self.path}: dropped an undecodable line {i + 1}",
                                  RuntimeWarning, stacklevel=2)
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def ok_rows(self) -> List[dict]:
        """Rows with ``status == "ok"``, first occurrence per id."""
        seen, out = set(), []
        for row in self.rows():
            if row.get("status", "ok") == "ok" and row.get("id") not in seen:
                seen.add(row.get("id"))
                out.append(row)
        return out

    def done_ids(self) -> set:
        """Ids of cases already finished successfully."""
        return {r.get("id") for r in self.ok_rows()}

    # writing ---------------------------------------------------------------------------------
    def _repair_tail(self) -> None:
        """Cut a trailing partial line (a run killed while writing) so appends stay valid.

        Checked before every append (one byte read), so a torn line left by any earlier
        writer is removed whatever this object has seen before."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                keep = data.rfind(b"\n") + 1          # 0 when there is no complete line
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, row: dict) -> None:
        """Append ``row`` as one line; flush and fsync before returning."""
        text = json.dumps(row, sort_keys=True, allow_nan=True, default=_json_default)
        if "\n" in text:
            raise ValueError("a result row must serialise to a single line")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        with open(self.path, "ab") as f:
            f.write(text.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def locked(self) -> Iterator["ResultStore"]:
        """Hold an exclusive lock on ``<path>.lock`` (refuses a second concurrent writer)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(
                        f"{self.path} is being written by another benchmark process "
                        f"(lock {lock_path}); wait for it or use another --out") from None
                raise
            yield self
        finally:
            os.close(fd)


def _json_default(obj):
    try:
        import numpy as np
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


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


def _now() -> str:
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
            row["timestamp"] = _now()
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


# ---------------------------------------------------------------------------------------------
# cases as Ray tasks
def case_to_dict(case: Case) -> Dict[str, Any]:
    """A case as plain data (what travels to a Ray task or a worker process)."""
    return {"suite": case.suite, "method": case.method, "options": case.options,
            "problem": case.problem, "image": case.image, "seed": case.seed,
            "prior": case.prior, "labels": case.labels, "trace": case.trace}


def case_from_dict(d: Dict[str, Any]) -> Case:
    """Inverse of :func:`case_to_dict`."""
    return Case(d["suite"], d["method"], d["options"], d["problem"], d["image"], d["seed"],
                d.get("prior", ""), labels=d.get("labels", {}), trace=d.get("trace", False))


#: Per Ray worker process: the suite contexts of the runs and searches it serves (each
#: prior loaded once), by token; the oldest goes beyond four.
_TASK_CONTEXTS: Dict[str, Any] = {}


def task_context(spec: Dict[str, Any]):
    """Inside a Ray task (a case or a tuning trial): the ``SuiteContext`` of ``spec``
    (``token``, ``suite``, ``quick``, ``device``, ``seed``, ``prior``), made once per worker
    process and token; ``device="auto"`` is resolved on the worker's own node."""
    token = spec["token"]
    if token not in _TASK_CONTEXTS:
        from .suites.common import SuiteContext
        while len(_TASK_CONTEXTS) >= 4:
            _TASK_CONTEXTS.pop(next(iter(_TASK_CONTEXTS)))
        device = spec["device"]
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        _TASK_CONTEXTS[token] = SuiteContext(suite=spec["suite"], quick=spec["quick"],
                                             device=device, seed=spec["seed"],
                                             prior=spec["prior"], progress=False)
    return _TASK_CONTEXTS[token]


def execute_case_task(spec: Dict[str, Any], case: Dict[str, Any]) -> dict:
    """Inside a Ray task: execute one case with the (cached) suite context of ``spec``
    (``token``, ``suite``, ``quick``, ``device``, ``seed``, ``prior``) -- the same
    ``SuiteContext.execute`` as in-process, hence the same numbers."""
    return task_context(spec).execute(case_from_dict(case))


def ray_outcomes(spec: Dict[str, Any], options) -> Callable[[Sequence[Case]], Iterator[Outcome]]:
    """``outcomes`` for :func:`run_cases` that runs the pending cases as Ray tasks
    (:func:`ctflow.distributed.cases.map_on_ray`), yielding them as they finish. ``spec``:
    the suite context's settings (``suite``, ``quick``, ``device``, ``seed``, ``prior``: a
    name/path or a ``FlowPrior``); ``options``: a ``ctflow.distributed.RayOptions``."""
    import uuid

    from ctflow.distributed.cases import map_on_ray

    spec = dict(spec, token=uuid.uuid4().hex)

    def outcomes(pending: Sequence[Case]) -> Iterator[Outcome]:
        if not pending:
            return
        by_id = {c.id: c for c in pending}
        items = [(c.id, case_to_dict(c)) for c in pending]
        for key, value, error, tb in map_on_ray("benchmarks.runner:execute_case_task", items,
                                                spec, options, paths=[str(REPO_ROOT)],
                                                device=str(spec["device"])):
            yield by_id[key], value, error, tb
    return outcomes


# ---------------------------------------------------------------------------------------------
# tuned settings laid over a suite's config
def read_json_object(path: Path, what: str) -> Dict[str, Any]:
    """The JSON object in the file ``path``; ``FileNotFoundError`` ("<what> file not found")
    or ``ValueError`` naming the file when it is missing, not JSON or not an object."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def load_settings(path) -> Dict[str, Dict[str, Any]]:
    """Tuned options per method from a settings file: ``tune``'s output ``{method: {"chosen":
    {...}, ...}}`` or a config-like ``{"methods": {method: {...}}}``. ``FileNotFoundError`` /
    ``ValueError`` name the file."""
    path = Path(path)
    data = read_json_object(path, "settings")
    if isinstance(data.get("methods"), dict):
        methods = data["methods"]
    else:
        methods = {m: v["chosen"] for m, v in data.items()
                   if isinstance(v, dict) and isinstance(v.get("chosen"), dict)}
    if not methods or not all(isinstance(v, dict) for v in methods.values()):
        raise ValueError(f"{path}: no tuned settings found; expected {{method: {{\"chosen\": "
                         f"{{...}}}}}} (written by tune) or {{\"methods\": {{method: {{...}}}}}}")
    return {str(m): dict(v) for m, v in methods.items()}


def apply_settings(ctx, path) -> Dict[str, Dict[str, Any]]:
    """Lay the tuned options of ``path`` over the suite config of ``ctx`` (this run only;
    the config file is not changed). The rows' ``config`` hash covers the result."""
    import copy

    settings = load_settings(path)
    cfg = copy.deepcopy(ctx.config())
    unknown = sorted(set(settings) - set(cfg["methods"]))
    if unknown:
        raise ValueError(f"{path}: settings for method(s) {unknown} that suite {ctx.suite!r} "
                         f"does not run ({', '.join(cfg['methods'])})")
    for method, opts in settings.items():
        cfg["methods"][method].update(opts)
    cfg["settings_file"] = {"path": str(Path(path).resolve()), "methods": settings}
    ctx._config = cfg
    return settings


def _import_suite(name: str):
    module = CASE_SUITES.get(name) or EXTERNAL_SUITES.get(name)
    if module is None:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)} or 'all'")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            raise FileNotFoundError(
                f"suite {name!r} needs the module {module} "
                f"({module.replace('.', '/')}.py), which is not present") from None
        raise


def run_suite(name: str, *, quick: bool = False, out=None, device: str = "cpu", seed: int = 0,
              prior=None, progress: bool = False, tune: bool = False, limit: Optional[int] = None,
              after_case: Optional[Callable[[int], None]] = None,
              command: Optional[str] = None,
              isolate: Optional[bool] = None, ray=None,
              settings=None) -> Optional[RunSummary]:
    """Run one suite (a case suite through the store, or an external module's ``run``).

    ``prior`` is a ``FlowPrior``, a name/path for ``ctflow.load_prior``, or ``None`` for the
    suite's default (``"ct64"``). ``tune=True`` runs the suite's validation grid instead and
    writes the chosen hyper-parameters to ``benchmarks/configs/<suite>.json``.
    ``limit`` runs only the first ``limit`` cases (smoke runs). ``command`` (the command line
    that started the run) is recorded in every row. ``isolate`` runs every case in a fresh
    process (:mod:`benchmarks.suites.worker`) so that CPU peak-memory measurements do not
    depend on earlier cases; default: on for full CPU runs with a prior given by name/path,
    off for ``quick`` runs, CUDA (``max_memory_allocated`` is reset per solve) and tuning.
    ``ray`` (an address, ``True`` or a ``ctflow.distributed.RayOptions``) runs the cases as
    Ray tasks (default off; not with ``isolate``: a Ray worker serves many cases, so CPU peak
    memory then depends on earlier cases as with ``--no-isolate``). ``settings`` (a file
    written by ``tune``) overlays tuned options on the suite's config for this run.
    """
    out = Path(out) if out is not None else (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    ray_opts = None
    if ray is not None and ray is not False:
        from ctflow.distributed.cluster import as_ray_options, check_installed
        ray_opts = as_ray_options(ray)
        check_installed()
    _check_device(device, on_ray=ray_opts is not None)
    module = _import_suite(name)
    if name in EXTERNAL_SUITES:
        if tune:
            raise ValueError(f"suite {name!r} has no hyper-parameters to tune")
        if ray_opts is not None:
            raise ValueError(f"suite {name!r} measures timings and memory on this machine; "
                             f"--ray applies to the case suites ({', '.join(CASE_SUITES)})")
        if settings is not None:
            raise ValueError(f"suite {name!r} takes no tuned settings")
        if not hasattr(module, "run"):
            raise AttributeError(f"{module.__name__} has no run(quick, out, device)")
        module.run(quick=quick, out=out, device=device)
        return None

    from .suites.common import SuiteContext
    by_name = prior is None or isinstance(prior, (str, Path))
    if isolate and ray_opts is not None:
        raise ValueError("--isolate and --ray exclude each other: Ray tasks run in long-lived "
                         "worker processes")
    if isolate is None:
        isolate = (not quick) and (not tune) and device == "cpu" and by_name \
            and ray_opts is None
    if isolate and not by_name:
        raise ValueError("isolate=True needs the prior as a bundled name or checkpoint path "
                         "(a worker process loads it), not a FlowPrior object")
    ctx = SuiteContext(suite=name, quick=quick, device=device, seed=seed, prior=prior,
                       progress=progress, load_prior=not isolate and ray_opts is None)
    if settings is not None:
        if tune:
            raise ValueError("tune starts from the suite's config; --settings applies to runs")
        apply_settings(ctx, settings)
    outcomes = None
    if ray_opts is not None:
        outcomes = ray_outcomes({"suite": name, "quick": bool(quick), "device": device,
                                 "seed": int(seed), "prior": prior}, ray_opts)
    if tune:
        from .suites.tuning import tune_suite
        return tune_suite(module, ctx, out=out, after_case=after_case, outcomes=outcomes)
    cases = module.cases(ctx)
    if limit is not None:
        cases = cases[:int(limit)]
    store = ResultStore(out / f"{name}.jsonl")
    if isolate:
        from .suites.worker import isolated_execute
        spec = {"suite": name, "quick": bool(quick), "device": device, "seed": int(seed),
                "prior": str(prior) if prior is not None else None}

        def execute(case: Case) -> dict:
            return isolated_execute(spec, case)
    else:
        execute = ctx.execute
    summary = run_cases(cases, execute, store, env=environment(device),
                        extra={"quick": bool(quick), "config": ctx.config_label(),
                               "command": command or _default_command(name, quick, device,
                                                                      seed, prior)},
                        progress=progress, after_case=after_case, outcomes=outcomes)
    return summary


def _default_command(name: str, quick: bool, device: str, seed: int, prior) -> str:
    parts = ["python -m benchmarks", name]
    if quick:
        parts.append("--quick")
    if device != "cpu":
        parts.append(f"--device {device}")
    if seed:
        parts.append(f"--seed {seed}")
    if isinstance(prior, (str, Path)):
        parts.append(f"--prior {prior}")
    elif prior is not None:
        parts.append(f"(prior object {getattr(prior, 'name', type(prior).__name__)!r})")
    return " ".join(parts)


def _check_device(device: str, *, on_ray: bool = False) -> None:
    import torch
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    # on Ray the tasks run on the cluster's GPUs; this (driver) machine may have none
    if device.startswith("cuda") and not on_ray and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; "
                         f"use --device cpu")


# ---------------------------------------------------------------------------------------------
# command line
def _parser() -> argparse.ArgumentParser:
    from ctflow.cli import add_ray_arguments

    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="ctflow benchmark suites (the MS-Flow paper's experiments). Results are "
                    "appended as JSON lines to <out>/<suite>.jsonl; reruns skip finished cases.")
    p.add_argument("suite", help="a suite (" + ", ".join(SUITES) + "), 'all', "
                   "'tune' (then the suite to tune follows) or 'report'")
    p.add_argument("target", nargs="?", default=None,
                   help="for 'tune': the suite whose hyper-parameters to tune")
    p.add_argument("--quick", action="store_true", help="tiny settings (minutes on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default=None, help=f"result folder (default {DEFAULT_OUT}, "
                   f"or <that>/quick with --quick)")
    p.add_argument("--seed", type=int, default=0, help="base seed of noise draws and solvers")
    p.add_argument("--prior", default=None, help="bundled prior name or checkpoint path "
                   "(default: ct64)")
    p.add_argument("--limit", type=int, default=None, help="run only the first LIMIT cases")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (also passed to worker processes); default: torch's")
    p.add_argument("--list", action="store_true", help="list the cases and whether each is "
                   "stored, run nothing")
    p.add_argument("--progress", dest="progress", action="store_true", default=True,
                   help="show a progress bar (default)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="run every case in a fresh process (default for full CPU runs: clean "
                        "peak-memory measurements)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every case in this process (faster; CPU peak memory then "
                        "depends on earlier cases)")
    p.add_argument("--no-report", action="store_true",
                   help="do not render the report after a suite finishes")
    g = add_ray_arguments(p, "cases")
    g.add_argument("--settings", default=None, metavar="FILE",
                   help="tuned options (a file written by 'tune') laid over the suite's "
                        "config for this run")
    g = p.add_argument_group("tune with Ray Tune ('tune [SUITE] --search FILE')")
    g.add_argument("--search", default=None, metavar="FILE",
                   help="search space (JSON: suite, method, space, num_samples, ...); see "
                        "docs/scaling.md")
    g.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="trials (default: the search file's num_samples)")
    g.add_argument("--settings-out", default=None, metavar="FILE",
                   help="where the best settings go (default: configs/<suite>.json, or "
                        "<out>/tune-<suite>.chosen.json with --quick)")
    return p


def _ray_options(args):
    """``RayOptions`` from ``--ray``/``--ray-retries``/``--ray-threads`` (``None`` without
    ``--ray``)."""
    if args.ray is None:
        return None
    from ctflow.distributed.cluster import RayOptions
    return RayOptions(address=None if args.ray == "local" else args.ray,
                      max_retries=args.ray_retries, threads=args.ray_threads,
                      quiet=not args.progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m benchmarks`` and ``ctflow bench``; returns the exit code."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = _parser().parse_args(argv)
    command = "python -m benchmarks " + " ".join(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["CTFLOW_BENCH_THREADS"] = str(args.threads)
    out = Path(args.out) if args.out else (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    from . import report as _report

    if args.suite == "report":
        written = _report.render(out)
        for path in written:
            print(path)
        if not written:
            print(f"no results found in {out}", file=sys.stderr)
            return 1
        return 0

    if args.suite == "tune" and args.search is not None:
        from .suites.tuning import ray_tune_main
        return ray_tune_main(args, out, _ray_options(args))

    if args.suite == "tune":
        if args.target not in CASE_SUITES:
            print(f"tune: give a suite to tune, one of {', '.join(CASE_SUITES)} "
                  f"(got {args.target!r})", file=sys.stderr)
            return 2
        summary = run_suite(args.target, quick=args.quick, out=out, device=args.device,
                            seed=args.seed, prior=args.prior, progress=args.progress, tune=True,
                            ray=_ray_options(args))
        print(summary.line(f"tune-{args.target}"))
        for path in _report.render(out, suites=[args.target]):
            print(path)
        return 1 if summary.failed else 0

    if args.target is not None:
        print(f"unexpected argument {args.target!r}", file=sys.stderr)
        return 2
    names = SUITES if args.suite == "all" else (args.suite,)
    for n in names:
        if n not in SUITES:
            print(f"unknown suite {n!r}; choose one of {', '.join(SUITES)}, all, tune, report",
                  file=sys.stderr)
            return 2
    if args.settings is not None and args.suite not in CASE_SUITES:
        print(f"--settings applies to one case suite ({', '.join(CASE_SUITES)}), not "
              f"{args.suite!r}", file=sys.stderr)
        return 2

    if args.list:
        return _list_cases(names, args, out)

    failed = 0
    for n in names:
        t0 = time.perf_counter()
        summary = run_suite(n, quick=args.quick, out=out, device=args.device, seed=args.seed,
                            prior=args.prior, progress=args.progress, limit=args.limit,
                            command=command, isolate=args.isolate,
                            ray=_ray_options(args) if n in CASE_SUITES else None,
                            settings=args.settings)
        if summary is None:
            print(f"{n}: done in {time.perf_counter() - t0:.1f} s -> {out}")
        else:
            print(summary.line(n))
            failed += len(summary.failed)
    if not args.no_report:
        for path in _report.render(out, suites=[n for n in names if n in CASE_SUITES]):
            print(path)
    if failed:
        print(f"{failed} case(s) failed; their rows carry status 'error' and the message "
              f"(rerun to retry them)", file=sys.stderr)
        return 1
    return 0


def _list_cases(names: Iterable[str], args, out: Path) -> int:
    from .suites.common import SuiteContext
    for n in names:
        if n not in CASE_SUITES:
            print(f"{n}: external suite ({EXTERNAL_SUITES[n]}.run)")
            continue
        module = _import_suite(n)
        ctx = SuiteContext(suite=n, quick=args.quick, device=args.device, seed=args.seed,
                           prior=args.prior, progress=False, load_prior=False)
        if args.settings is not None:
            apply_settings(ctx, args.settings)
        cases = module.cases(ctx)
        done = ResultStore(out / f"{n}.jsonl").done_ids()
        print(f"{n}: {len(cases)} cases, {sum(c.id in done for c in cases)} stored")
        for c in cases:
            mark = "done" if c.id in done else "pending"
            print(f"  {mark} {c.id} {c.method:8s} {c.image} {_canonical(c.labels)}")
    return 0
