r"""Benchmark cases: one solve each, with a stable id.

A *case* is one solve: a suite, a method with its options, a problem (operator and noise), one
image and a seed. Its id is a stable hash of exactly these fields,

.. math:: \mathrm{id} = \mathrm{sha1}\big(\mathrm{json}(\text{suite, method, options, problem,
          image, seed, prior})\big)[:16],

with sorted keys and fixed separators, so the same case has the same id in every process and on
every machine, and a change of any option makes a new case.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict

__all__ = ["Case", "case_id", "canonical", "case_to_dict", "case_from_dict", "derived_seed"]


def canonical(obj: Any) -> str:
    """Canonical JSON text (sorted keys, no spaces); floats keep their ``repr``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def case_id(suite: str, method: str, options: dict, problem: dict, image: str, seed: int,
            prior: str = "") -> str:
    """Stable 16-hex-digit id of a case (sha1 of the canonical JSON of its defining fields)."""
    key = canonical({"suite": suite, "method": method, "options": options, "problem": problem,
                     "image": image, "seed": int(seed), "prior": str(prior)})
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from the canonical JSON of ``parts`` (stable across processes)."""
    digest = hashlib.sha1(canonical(list(parts)).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class Case:
    """One solve of a benchmark suite.

    Attributes:
        suite: the suite name (``"ct-sparse"``, ...).
        method: the solver method passed to ``ctflow.reconstruct`` (a name of
            ``ctflow.solvers.METHODS``).
        options: the solver options (JSON-serialisable), passed as ``**options``.
        problem: the forward problem (operator kind and parameters, noise model and level).
        image: the image id (``<split>/<file stem>``).
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


def case_to_dict(case: Case) -> Dict[str, Any]:
    """A case as plain data (what travels to a Ray task or a worker process)."""
    return {"suite": case.suite, "method": case.method, "options": case.options,
            "problem": case.problem, "image": case.image, "seed": case.seed,
            "prior": case.prior, "labels": case.labels, "trace": case.trace}


def case_from_dict(d: Dict[str, Any]) -> Case:
    """Inverse of :func:`case_to_dict`."""
    return Case(d["suite"], d["method"], d["options"], d["problem"], d["image"], d["seed"],
                d.get("prior", ""), labels=d.get("labels", {}), trace=d.get("trace", False))
