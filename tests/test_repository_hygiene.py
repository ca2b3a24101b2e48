"""What the repository ships holds no machine-specific path (a user's clone has no
``/work/...``, ``/home/...``): bundled priors, training states, results, docs and code."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache",
             "node_modules", "runs", "out"}
SUFFIXES = {".py", ".md", ".json", ".jsonl", ".txt", ".toml", ".cfg", ".yaml", ".yml", ".sh"}
ABSOLUTE = re.compile(r"(?<![A-Za-z0-9_.~/-])/(work|home|root|Users|mnt|tmp)/[A-Za-z0-9_.-]")


def _files():
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and (path.suffix in SUFFIXES or path.name in ("Makefile",)):
            yield path


def test_no_machine_specific_paths_in_the_repository():
    offenders = []
    for path in _files():
        if path.name == Path(__file__).name:
            continue
        text = path.read_text(errors="replace")
        for m in ABSOLUTE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {text[m.start():m.start() + 40]!r}")
    assert not offenders, "machine-specific paths:\n" + "\n".join(offenders[:20])


def test_portable_rewrites_run_folder_and_absolute_paths(tmp_path):
    from ctflow.training.portable import portable

    cwd = tmp_path / "main"
    run = tmp_path / "runs" / "ctpatch"
    rec = {"commands": [f"ctflow train patches {tmp_path}/shared/data/ct --out {run}"],
           "sources": [f"{cwd}/data/x.dcm", 3]}
    out = portable(rec, run, cwd=cwd)
    assert out == {"commands": ["ctflow train patches ../shared/data/ct --out runs/ctpatch"],
                   "sources": ["data/x.dcm", 3]}
