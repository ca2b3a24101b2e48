r"""Connecting to Ray and the settings every distributed ctflow run shares.

Nothing here imports Ray at module import time: ``import ctflow`` and ``ctflow --help`` never
load it. :func:`require_ray` imports it on first use and says what to install when it is
missing (``pip install 'ctflow[ray]'``).

Addresses (``--ray [ADDRESS]`` on the command line, :attr:`RayOptions.address` in Python):

* ``None`` or ``"local"`` -- start a private Ray instance in this process's session, bound to
  the loopback interface only (``127.0.0.1``; nothing is reachable from other machines), with
  every CPU of the machine (or :attr:`RayOptions.num_cpus`); it is shut down when the run ends;
* ``"auto"`` -- join the cluster started on this machine by ``ray start --head``;
* ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` -- join that cluster (Ray Client for ``ray://``).

If this process is already connected to Ray (``ray.is_initialized()``), that connection is used
whatever the address says and is left open at the end (this is how the tests share one local
instance between runs).

Resources of one task (:func:`task_resources`): one CPU, and one GPU when the cluster reports
GPUs and the run's device is not ``"cpu"`` (:attr:`RayOptions.gpus_per_task` overrides).
Inside a task :func:`worker_setup` sets ``torch.set_num_threads(threads)`` (default 1: on a
CPU node one task per core beats several tasks fighting over every core's thread pool, and the
tiny tensor operations of a 64 x 64 solve get *slower* with a thread pool).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

__all__ = ["RayOptions", "as_ray_options", "require_ray", "check_installed", "connect",
           "cluster_gpus", "task_resources", "worker_setup", "as_completed", "cancel",
           "with_address", "LOCAL", "LOOPBACK_ENV"]

#: The address meaning "start a private local instance".
LOCAL = "local"
#: Environment variable that makes a Ray node take the loopback address as its node address
#: (Ray then binds its servers to 127.0.0.1 only); read by Ray when it is imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_INSTALL_HINT = "install the extra: pip install 'ctflow[ray]' (Ray >= 2.40 with Ray Tune)"


@dataclass(frozen=True)
class RayOptions:
    """How a run uses Ray.

    Attributes:
        address: ``None``/``"local"`` (a private loopback-only instance), ``"auto"`` or a
            cluster address (see the module docstring).
        max_retries: times Ray re-runs a task whose worker process died (a killed or crashed
            worker, a lost node). Exceptions raised by the work itself are not retried: they
            are deterministic and would fail again.
        threads: ``torch.set_num_threads`` inside every task (``None`` leaves torch's
            default).
        gpus_per_task: GPUs each task requests; ``None`` means 1 when the cluster reports GPUs
            and the run's device is not the CPU, else 0.
        num_cpus: CPUs of a private local instance (default: all of this machine's); ignored
            when joining a cluster.
        task_hook: a callable run inside the worker at the start of every task with the task's
            key (a slice's SOPInstanceUID, a benchmark case id), e.g. for tracing or for fault
            injection in tests; it must be picklable by value (cloudpickle).
        quiet: do not forward the workers' log output to this process.
    """

    address: Optional[str] = None
    max_retries: int = 3
    threads: Optional[int] = 1
    gpus_per_task: Optional[float] = None
    num_cpus: Optional[int] = None
    task_hook: Optional[Callable[[str], None]] = None
    quiet: bool = False

    def __post_init__(self):
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or \
                self.max_retries < 0:
            raise ValueError(f"RayOptions.max_retries must be an integer >= 0, got "
                             f"{self.max_retries!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"RayOptions.threads must be None or an integer >= 1, got "
                             f"{self.threads!r}")
        if self.gpus_per_task is not None and not (float(self.gpus_per_task) >= 0):
            raise ValueError(f"RayOptions.gpus_per_task must be >= 0, got "
                             f"{self.gpus_per_task!r}")
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or
                                          self.num_cpus < 1):
            raise ValueError(f"RayOptions.num_cpus must be an integer >= 1, got "
                             f"{self.num_cpus!r}")
        if self.task_hook is not None and not callable(self.task_hook):
            raise ValueError("RayOptions.task_hook must be callable (key) -> None")

    @property
    def label(self) -> str:
        """The address as recorded in summaries (``"local"`` for a private instance)."""
        return self.address or LOCAL


def as_ray_options(value: Union[None, bool, str, RayOptions, Dict[str, Any]]
                   ) -> Optional[RayOptions]:
    """``None``/``False`` → ``None`` (run in-process); ``True`` → a private local instance;
    a string → that address; a dict → ``RayOptions(**dict)``; a :class:`RayOptions` →
    itself."""
    if value is None or value is False:
        return None
    if value is True:
        return RayOptions()
    if isinstance(value, RayOptions):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("the Ray address is empty; give 'local', 'auto' or HOST:PORT")
        return RayOptions(address=None if text == LOCAL else text)
    if isinstance(value, dict):
        return RayOptions(**value)
    raise ValueError(f"ray must be None, True, an address string, a dict or RayOptions; got "
                     f"{type(value).__name__}")


def check_installed() -> None:
    """``ImportError`` naming the extra when Ray is not installed; does not import Ray (so a
    private instance started later can still be bound to the loopback interface)."""
    import importlib.util

    if "ray" in sys.modules:
        if sys.modules["ray"] is None:
            raise ImportError(f"this run needs Ray, which is not importable; {_INSTALL_HINT}")
        return
    if importlib.util.find_spec("ray") is None:
        raise ImportError(f"this run needs Ray, which is not installed; {_INSTALL_HINT}")


def require_ray():
    """Import and return :mod:`ray` (``ImportError`` naming the extra to install if absent)."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"this run needs Ray, which is not installed ({exc}); "
                          f"{_INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def connect(options: Optional[RayOptions] = None) -> Iterator[Any]:
    """Connect to Ray for the duration of the ``with`` block; yields the :mod:`ray` module.

    Reuses an existing connection of this process (and leaves it open); otherwise starts a
    private loopback-only instance (``address`` ``None``/``"local"``) or joins the cluster at
    ``address``, and shuts the connection down at the end.
    """
    options = options or RayOptions()
    local = options.address in (None, LOCAL)
    if local and "ray" not in sys.modules:
        # Ray reads this when imported: the node takes 127.0.0.1 as its address and binds
        # its servers there, so a private instance is not reachable from the network.
        os.environ.setdefault(LOOPBACK_ENV, "0")
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        kw: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": not options.quiet,
                              "configure_logging": True, "logging_level": "WARNING"}
        if local:
            kw["address"] = LOCAL
            if options.num_cpus is not None:
                kw["num_cpus"] = int(options.num_cpus)
        else:
            kw["address"] = options.address
        try:
            ray.init(**kw)
        except ConnectionError as exc:
            raise ConnectionError(f"cannot connect to the Ray cluster at {options.address!r}: "
                                  f"{exc}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def cluster_gpus() -> float:
    """GPUs the connected cluster reports (0 on a CPU-only cluster)."""
    ray = require_ray()
    return float(ray.cluster_resources().get("GPU", 0.0))


def task_resources(options: RayOptions, device: Any = "auto") -> Dict[str, float]:
    """``{"num_cpus": 1, "num_gpus": g}`` for one task: ``g`` is
    :attr:`RayOptions.gpus_per_task` if set, else 1 when the cluster reports GPUs and
    ``device`` is not the CPU, else 0."""
    if options.gpus_per_task is not None:
        gpus = float(options.gpus_per_task)
    else:
        on_cpu = str(device).strip().lower().startswith("cpu")
        gpus = 1.0 if (not on_cpu and cluster_gpus() > 0) else 0.0
    return {"num_cpus": 1, "num_gpus": gpus}


def worker_setup(threads: Optional[int]) -> None:
    """Run at the start of every task: torch's CPU thread count (``None``: unchanged)."""
    if threads is not None:
        import torch

        if torch.get_num_threads() != int(threads):
            torch.set_num_threads(int(threads))


def as_completed(refs: Iterable[Any]) -> Iterator[Any]:
    """Yield the object references of ``refs`` one by one as their tasks finish (successfully
    or not; ``ray.get`` on a yielded reference returns at once or raises the task's error)."""
    ray = require_ray()
    pending: List[Any] = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield from done


def cancel(refs: Iterable[Any]) -> None:
    """Cancel unfinished tasks (best effort; finished ones are unaffected)."""
    ray = require_ray()
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=False)


def with_address(options: RayOptions, address: Optional[str]) -> RayOptions:
    """A copy of ``options`` with another address."""
    return replace(options, address=address)


#: The scale-out options of every command that can run on Ray, as data (flags, keywords),
#: so the command line and the benchmark runner offer the same ones; ``{what}`` in a help
#: text names what runs as tasks.
RAY_ARGUMENTS = (
    (("--ray",), dict(nargs="?", const="local", default=None, metavar="ADDRESS",
                      help="run the {what} as Ray tasks: without ADDRESS on a private local "
                           "instance (loopback only, every core); 'auto' joins the cluster "
                           "of 'ray start' on this machine; HOST:PORT or ray://HOST:PORT a "
                           "remote one")),
    (("--ray-retries",), dict(type=int, default=3, metavar="N",
                              help="re-runs of a task whose worker process died")),
    (("--ray-threads",), dict(type=int, default=1, metavar="T",
                              help="torch threads inside each task")),
)


def ray_options_from(ray: Optional[str], *, retries: int = 3, threads: int = 1,
                     quiet: bool = False) -> Optional[RayOptions]:
    """``RayOptions`` from the values of :data:`RAY_ARGUMENTS` (``None`` without ``--ray``);
    ``ValueError`` for a negative retry count or fewer than one thread."""
    if ray is None:
        return None
    if retries < 0:
        raise ValueError(f"--ray-retries must be >= 0, got {retries}")
    if threads < 1:
        raise ValueError(f"--ray-threads must be >= 1, got {threads}")
    return RayOptions(address=None if ray == "local" else ray, max_retries=retries,
                      threads=threads, quiet=quiet)
