r"""The JSON-lines result store: one append-only file per suite, safe against kills.

Every finished case appends one JSON line to ``<out>/<suite>.jsonl`` right away (open, append,
flush, ``fsync``). A killed run therefore leaves at most one partial last line; the reader drops
undecodable lines and the writer cuts a partial tail before it appends. Only one process may
write a store at a time (an exclusive ``flock`` on ``<suite>.jsonl.lock``).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

__all__ = ["ResultStore", "StoreLockedError", "read_json_object"]


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
