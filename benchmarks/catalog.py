"""The suites: which module runs each, and in which order ``all`` runs them.

Case suites (``benchmarks/suites/<name>.py`` with ``cases(ctx)`` and ``tuning_spec(ctx)``) run
through the result store; the other suites are modules with ``run(quick, out, device)`` that
write their own tables and plots. Modules are imported by name on use, so listing the suites
imports none of them.
"""
from __future__ import annotations

import importlib

__all__ = ["CASE_SUITES", "EXTERNAL_SUITES", "SUITES", "import_suite"]

#: Suites whose cases run through :func:`benchmarks.execution.run_cases`.
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
    "unet-speed": "benchmarks.unet_speed",
}
#: Every suite, in the order ``all`` runs them.
SUITES = ("operators", "memory", "convergence", "jacobi", "ct-sparse", "ablation",
          "restoration", "latent", "unet-speed")


def import_suite(name: str):
    """The module of suite ``name``; ``ValueError`` for an unknown name, ``FileNotFoundError``
    when its module is missing."""
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
