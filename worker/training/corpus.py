"""The training corpus of the shipped target: the running interpreter's standard library source.

A document is one `.py` file, named by its dotted module path (`json/decoder.py` ->
`json.decoder`, `json/__init__.py` -> `json`). Left out: test packages (any directory named
`test`, `tests` or `idle_test`, which covers `test/`, `unittest/test`, `lib2to3/tests` and
`idlelib/idle_test`), third-party code (`site-packages`, `dist-packages`), and files the build
generates rather than a person writes (`_sysconfigdata_*.py`, the `config-*` directory). Files
that are not valid UTF-8 are skipped and counted.

Split rule, fixed so that every run and every later stage agree: a module is held out iff
`zlib.crc32(module.encode()) % 20 == 0` (about 5% of modules). Documents are sorted by module
name within each split.

Knows: where the files are and how they are split. Does not know: tokens or models.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HELDOUT_MODULUS = 20
"""A module is held out iff crc32(name) % HELDOUT_MODULUS == 0."""
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                           "__pycache__"})
"""Directory names never descended into, at any depth."""


@dataclass(frozen=True)
class Document:
    module: str
    """Dotted module path, e.g. `json.decoder`."""
    text: str
    """The file's source, decoded as UTF-8, unchanged."""


@dataclass
class Corpus:
    train: list[Document]
    heldout: list[Document]
    num_undecodable: int = 0
    """Files skipped because they are not valid UTF-8."""
    root: str = ""
    """The directory the files were read from."""
    undecodable: list[str] = field(default_factory=list)
    """Module names of the skipped files."""

    def summary(self) -> dict:
        """Files and UTF-8 bytes per split, plus the number of undecodable files skipped."""
        def split(docs: list[Document]) -> dict:
            return {"files": len(docs), "bytes": sum(len(d.text.encode()) for d in docs)}

        return {"train": split(self.train), "heldout": split(self.heldout),
                "undecodable_files": self.num_undecodable}

    def capped(self, max_train_bytes: int, max_heldout_bytes: int) -> "Corpus":
        """A prefix of each split (in module order) of at most the given sizes; for smoke runs."""
        return Corpus(_prefix(self.train, max_train_bytes),
                      _prefix(self.heldout, max_heldout_bytes),
                      self.num_undecodable, self.root, list(self.undecodable))


def is_heldout(module: str) -> bool:
    """The fixed split rule (see the module docstring)."""
    return zlib.crc32(module.encode()) % HELDOUT_MODULUS == 0


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(root: str | os.PathLike | None = None) -> Corpus:
    """Read every source file under `root` (default: the standard library) and split it."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a directory; "
                                "expected a standard library tree")
    train, heldout, undecodable = [], [], []
    for path in _source_files(root):
        module = module_name(path.relative_to(root))
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            undecodable.append(module)
            continue
        if not text.strip():
            continue
        (heldout if is_heldout(module) else train).append(Document(module, text))
    if not train or not heldout:
        raise ValueError(f"corpus under {root} has {len(train)} train and {len(heldout)} "
                         "held-out files; expected both splits non-empty")
    key = lambda d: d.module  # noqa: E731
    return Corpus(sorted(train, key=key), sorted(heldout, key=key), len(undecodable), str(root),
                  sorted(undecodable))


def module_name(rel_path: Path) -> str:
    """`json/decoder.py` -> `json.decoder`; `json/__init__.py` -> `json`."""
    parts = list(rel_path.with_suffix("").parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames
                             if d not in EXCLUDED_DIRS
                             and not (rel == Path(".") and d.startswith("config-")))
        found += [Path(dirpath, f) for f in sorted(filenames)
                  if f.endswith(".py") and not f.startswith("_sysconfigdata_")]
    return found


def _prefix(docs: list[Document], max_bytes: int) -> list[Document]:
    out, total = [], 0
    for doc in docs:
        size = len(doc.text.encode())
        if out and total + size > max_bytes:
            break
        out.append(doc)
        total += size
    return out
