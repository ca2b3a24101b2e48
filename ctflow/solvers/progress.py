"""Progress bars of the iterative solvers (tqdm when asked, else a silent stand-in)."""
from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["progress"]


class _Silent:
    """The methods of a tqdm bar that the solvers call, doing nothing."""

    def __init__(self, iterable: Optional[Iterable] = None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Optional[Iterable] = None, *, enabled: bool, desc: str,
             total: Optional[int] = None):
    """A tqdm bar over ``iterable`` (or of ``total`` steps, advanced with ``update``) when
    ``enabled``; else an object with the same methods that shows nothing (iterating it
    iterates ``iterable``)."""
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)
    return _Silent(iterable)
