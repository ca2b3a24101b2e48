r"""The options convention of every solver, and the checks it is built from.

Every solver class has one frozen dataclass ``Options`` (``MSFlow.Options``, ``TV.Options``,
...) derived from :class:`SolverOptions`. Its fields are the option names, their defaults are
documented in that dataclass only, and ``__post_init__`` checks every value (a
``ValueError`` naming the solver, the option and the allowed values) and refuses options that
would have no effect in the given combination (:meth:`SolverOptions.refuse_unless`).

``Solver(**kw)`` builds the options (:meth:`SolverOptions.build`: unknown names raise a
``ValueError`` listing the allowed ones) and ``Solver(options)`` takes an ``Options``
instance.

The ``check_*`` helpers return the checked value in a canonical type (``int``, ``float``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Dict, Iterable, Mapping, Optional, Sequence

import torch

__all__ = [
    "SolverOptions", "check_options", "check_choice", "check_float", "check_positive",
    "check_probability", "check_int", "check_bool", "check_seed", "check_x_init",
    "record_options",
]


# ---------------------------------------------------------------------------------------------
# value checks
# ---------------------------------------------------------------------------------------------
def check_options(given: Mapping[str, Any], allowed: Iterable[str], *, owner: str) -> None:
    """Refuse option names that ``owner`` does not know (``ValueError`` listing the known ones)."""
    allowed = sorted(allowed)
    bad = sorted(k for k in given if k not in allowed)
    if bad:
        raise ValueError(f"{owner}: unknown option(s) {', '.join(map(repr, bad))}; allowed "
                         f"options are {', '.join(allowed)}")


def check_choice(name: str, value: Any, choices: Sequence[Any], *, owner: str) -> Any:
    """``value`` must be one of the strings ``choices`` (the message lists them)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: option {name} must be one of "
                         f"{', '.join(map(repr, choices))}, got {value!r}")
    return value


def is_number(v: Any) -> bool:
    """A real number (Python or NumPy), not a ``bool``."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _range_text(minimum: Optional[float], maximum: Optional[float], min_open: bool,
                max_open: bool) -> str:
    if minimum is None and maximum is None:
        return ""
    if maximum is None:
        return f" {'>' if min_open else '>='} {minimum:g}"
    if minimum is None:
        return f" {'<' if max_open else '<='} {maximum:g}"
    return f" in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"


def check_float(name: str, value: Any, *, owner: str, minimum: Optional[float] = None,
                maximum: Optional[float] = None, min_open: bool = False,
                max_open: bool = False) -> float:
    """A finite real number with ``minimum <= value <= maximum`` (``min_open`` / ``max_open``
    make a bound strict; a bound of ``None`` is no bound). Returns it as a ``float``."""
    ok = is_number(value) and math.isfinite(float(value))
    if ok and minimum is not None:
        ok = float(value) > minimum if min_open else float(value) >= minimum
    if ok and maximum is not None:
        ok = float(value) < maximum if max_open else float(value) <= maximum
    if not ok:
        raise ValueError(f"{owner}: option {name} must be a finite number"
                         f"{_range_text(minimum, maximum, min_open, max_open)}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any, *, owner: str, allow_zero: bool = False) -> float:
    """A finite real number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    return check_float(name, value, owner=owner, minimum=0.0, min_open=not allow_zero)


def check_probability(name: str, value: Any, *, owner: str, open_low: bool = False) -> float:
    """A number in ``[0, 1]`` (``(0, 1]`` with ``open_low``)."""
    return check_float(name, value, owner=owner, minimum=0.0, maximum=1.0, min_open=open_low)


def check_int(name: str, value: Any, *, owner: str, minimum: int = 1,
              maximum: Optional[int] = None) -> int:
    """An integer (Python or NumPy; ``bool`` refused) with ``minimum <= value`` and, when
    ``maximum`` is given, ``value <= maximum``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and \
        minimum <= int(value) and (maximum is None or int(value) <= maximum)
    if not ok:
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}: option {name} must be an integer {rng}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any, *, owner: str) -> bool:
    """``True`` or ``False`` (other truthy values such as ``1`` or ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: option {name} must be True or False, got {value!r}")
    return value


def check_seed(value: Any, *, owner: str, name: str = "seed") -> int:
    """A random seed: an integer in :math:`[0, 2^{63} - 1]` (what a torch generator takes)."""
    return check_int(name, value, owner=owner, minimum=0, maximum=2 ** 63 - 1)


def check_x_init(value: Any, *, owner: str) -> Optional[torch.Tensor]:
    """``x_init``: ``None`` or a floating tensor (its shape is checked against the problem when
    the solver runs)."""
    if value is not None and not (isinstance(value, torch.Tensor)
                                  and value.is_floating_point()):
        raise ValueError(f"{owner}: option x_init must be None or a floating torch.Tensor "
                         f"of shape (B, C, *operator.domain_shape), got {type(value).__name__}")
    return value


def record_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """The options as plain values for :attr:`Reconstruction.options` (a tensor is recorded
    by its shape, a callable by its name)."""
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"tensor{tuple(v.shape)}"
        elif callable(v) and not isinstance(v, (str, numbers.Number)):
            out[k] = getattr(v, "__name__", type(v).__name__)
        else:
            out[k] = v
    return out


def _differs(value: Any, default: Any) -> bool:
    """Whether an option value differs from its default (tensors and callables always do)."""
    if isinstance(value, torch.Tensor) or (callable(value) and not isinstance(value, str)):
        return True
    return value != default


# ---------------------------------------------------------------------------------------------
# the options base
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class SolverOptions:
    """Options every solver takes.

    Attributes:
        seed: the random seed (an integer in :math:`[0, 2^{63}-1]`); solvers without
            randomness accept it for a uniform interface (``reconstruct`` may pass one to
            every method).
        progress: show a tqdm progress bar.

    Subclasses are frozen dataclasses too; they check their own fields in :meth:`check`
    (called by ``__post_init__`` after ``seed`` and ``progress``).
    """

    #: the solver's name in error messages (set by each subclass)
    OWNER: ClassVar[str] = "solver"

    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        own = self.OWNER
        self._set("seed", check_seed(self.seed, owner=own))
        self._set("progress", check_bool("progress", self.progress, owner=own))
        self.check()

    def check(self) -> None:
        """Check (and canonicalise with :meth:`_set`) the subclass's fields."""

    # -- helpers for check() --------------------------------------------------------------
    def _set(self, name: str, value: Any) -> None:
        """Store a canonical value in the frozen instance (only during the checks)."""
        object.__setattr__(self, name, value)

    def is_default(self, name: str) -> bool:
        """Whether option ``name`` has its default value."""
        f = self.__dataclass_fields__[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return not _differs(getattr(self, name), default)

    def refuse_unless(self, active: bool, names: Iterable[str], why: str) -> None:
        """Options ``names`` only act when ``active``: a non-default value of one of them is
        refused (``ValueError`` saying ``why`` it has no effect) when ``active`` is false."""
        if active:
            return
        for name in names:
            if not self.is_default(name):
                value = getattr(self, name)
                shown = record_options({name: value})[name]
                raise ValueError(f"{self.OWNER}: option {name}={shown!r} has no effect {why}; "
                                 f"leave it at its default")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple:
        """The option names, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, options: Optional["SolverOptions"] = None, /, **kw: Any) -> "SolverOptions":
        """The options from an ``Options`` instance and/or keywords (keywords override the
        instance's values); unknown names raise ``ValueError`` listing the allowed ones."""
        check_options(kw, cls.names(), owner=cls.OWNER)
        if options is None:
            return cls(**kw)
        if not isinstance(options, cls):
            raise ValueError(f"{cls.OWNER}: options must be a {cls.__qualname__} (or give "
                             f"keyword options), got {type(options).__name__}")
        return options.replace(**kw) if kw else options

    def replace(self, **kw: Any) -> "SolverOptions":
        """A copy with the options ``kw`` changed (checked again)."""
        check_options(kw, self.names(), owner=self.OWNER)
        return dataclasses.replace(self, **kw)

    def as_dict(self) -> Dict[str, Any]:
        """``{name: value}`` (values as stored; tensors are not copied)."""
        return {name: getattr(self, name) for name in self.names()}
