"""Recommended solver settings carried by a prior.

A prior's JSON description may hold the solver options it was tuned with, per task and
method::

    "recommended": {"ct-sparse": {"msflow": {"K": 8, ...}, "dflow": {...}, "tv": {...}}},
    "recommended_about": "how and on what they were chosen"

:func:`ctflow.reconstruct` uses them when the caller passes no solver options (``seed`` and
``progress`` do not count): ``preset=None`` or ``"recommended"``. Explicit options replace
them entirely (the solver's defaults fill the rest), and ``preset="paper"`` always runs the
solver's own defaults (the paper's layout). :func:`choose_options` returns the options to
run and a note saying which were used (the result's ``options["preset"]``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["PRESETS", "recommended_options", "choose_options"]

#: The names ``preset=`` accepts.
PRESETS = ("recommended", "paper")

# Options that choose no numerical setting (they never count as "options given").
_NEUTRAL = ("seed", "progress")


def recommended_options(prior: Any, method: str, *, task: Optional[str] = None
                        ) -> Dict[str, Any]:
    """The options ``prior`` recommends for ``method`` (``{}`` if none). ``task`` picks the
    task (default: the first the prior lists, e.g. ``"ct-sparse"``)."""
    config = getattr(prior, "config", None) or {}
    table = config.get("recommended") if isinstance(config, Mapping) else None
    if not isinstance(table, Mapping) or not table:
        return {}
    if task is None:
        task = next(iter(table))
    if task not in table:
        raise ValueError(f"prior {getattr(prior, 'name', '?')!r} recommends settings for "
                         f"{sorted(table)}, not for task {task!r}")
    entry = table[task].get(method) if isinstance(table[task], Mapping) else None
    return dict(entry) if isinstance(entry, Mapping) else {}


def choose_options(prior: Any, method: str, options: Mapping[str, Any], *,
                   preset: Optional[str] = None, task: Optional[str] = None
                   ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """``(options to run, note)``: the prior's recommended options for ``method`` when
    ``options`` holds none but ``seed``/``progress`` and ``preset`` is ``None`` or
    ``"recommended"``; otherwise ``options`` unchanged. ``note`` (``None`` when the prior
    recommends nothing) says what was used: ``{"preset": ..., "prior": ..., "task": ...,
    "options": ...}``."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS} or None, got {preset!r}")
    options = dict(options)
    if prior is None:
        if preset == "recommended":
            raise ValueError("preset='recommended' needs a prior that carries recommended "
                             "settings")
        return options, None
    name = getattr(prior, "name", None)
    if preset == "paper":
        return options, {"preset": "paper", "prior": name,
                         "options": "the solver's defaults and the options given"}
    rec = recommended_options(prior, method, task=task)
    given = {k for k in options if k not in _NEUTRAL}
    if not rec:
        if preset == "recommended":
            raise ValueError(f"prior {name!r} recommends no settings for {method!r}")
        return options, None
    if given:
        if preset == "recommended":
            raise ValueError(f"preset='recommended' with explicit options {sorted(given)}: "
                             "pass one or the other")
        return options, {"preset": "explicit", "prior": name,
                         "options": "the options given (the prior's recommendation unused)"}
    table = prior.config["recommended"]
    used_task = task if task is not None else next(iter(table))
    return {**rec, **options}, {"preset": "recommended", "prior": name, "task": used_task,
                                "options": rec}
