"""Every document the repository cites is in the repository, with the sections it cites.

The code, tests, scripts and deploy files name Markdown files (`docs/DSPARK.md`,
`bench/README.md`, ...) and sections of the design notes ("docs/DSPARK.md 1.3", "docs/DSPARK.md
section 3", next to labels such as "Algorithm 1"). A reader must find each of them here: the
project never needs a file from outside its repository.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml", ".toml", ".proto", ".service"}
SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "dist", "node_modules"}

# A Markdown file name or path, not part of a longer path or a URL.
MD_REF = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-][\w.-]*\.md)\b")
# A section number, a range of them, or a list ("1.3, 1.4", "1-2 and 5").
_NUM = r"\d+(?:\.\d+)?"
_ITEM = rf"{_NUM}(?:\s*-\s*{_NUM})?"
SECTION_REF = re.compile(
    rf"(docs/[\w./-]+\.md)(?:[\s#*]|//)+(?:§\s*|section\s+)?"
    rf"({_ITEM}(?:\s*(?:,|and)\s*{_ITEM}(?![\w.]|\s+(?!and\b)[A-Za-z]))*)"
    rf"(?:\s+step\s+(\d+))?(?![\w.]*\d)")
LABEL = re.compile(r"\b(Algorithm|Alg\.|Appendix|Eq\.|Equation)\s*\(?([A-Z]|\d+)\b")
HEADING_NUMBER = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?=\s)", re.MULTILINE)


def repository_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore; a plain walk outside git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
            capture_output=True, text=True, check=True).stdout
        names = sorted(set(out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            names += [str((Path(folder) / f).relative_to(ROOT)) for f in files]
    paths = [ROOT / n for n in names if not set(Path(n).parts) & SKIP_DIRS]
    return [p for p in paths if p.is_file()]


def scanned_files() -> list[Path]:
    """The files whose text may cite documents: sources, scripts, docs, configs, Dockerfiles."""
    this = Path(__file__).resolve()  # its examples cite made-up documents on purpose
    return [p for p in repository_files() if p != this and (
        p.suffix in SUFFIXES or p.name.startswith("Dockerfile") or p.parent.name == ".ci")]


def markdown_refs(text: str) -> list[str]:
    return MD_REF.findall(text)


def resolves(ref: str, citing: Path) -> bool:
    """A reference resolves from the repository root or from the citing file's folder."""
    return any((base / ref).is_file() for base in (ROOT, citing.parent))


def section_refs(text: str) -> list[tuple[str, list[str], str]]:
    """(doc path, section numbers, surrounding text) of every "docs/X.md N" citation; a range
    gives its two ends, "section S step N" gives S.N."""
    found = []
    for m in SECTION_REF.finditer(text):
        numbers = [n for item in re.split(r"\s*(?:,|and)\s*", m.group(2))
                   for n in re.split(r"\s*-\s*", item)]
        if m.group(3):
            numbers = [f"{n}.{m.group(3)}" for n in numbers]
        window = text[max(0, m.start() - 100):m.end() + 60]
        found.append((m.group(1), numbers, window))
    return found


def headings(doc: Path) -> set[str]:
    return set(HEADING_NUMBER.findall(doc.read_text(encoding="utf-8")))


def label_in(label: tuple[str, str], doc_text: str) -> bool:
    kind, value = label
    words = {"Algorithm": r"Algorithm", "Alg.": r"Algorithm", "Appendix": r"Appendix",
             "Eq.": r"(?:Eq\.|Equation)", "Equation": r"(?:Eq\.|Equation)"}[kind]
    return re.search(rf"{words}\s*\(?{re.escape(value)}\b", doc_text) is not None


# -- the scanner itself -------------------------------------------------------------------------
def test_scanner_finds_references_and_flags_missing_ones(tmp_path):
    url = "https://example.org/x/NOTES" + ".md"  # split: no scanner should read it as ours
    text = ("see docs/DSPARK.md 1.3, 1.4 and `bench/README.md`; " + url + " "
            "is a URL; Algorithm 1 as printed in docs/DSPARK.md section 3; (docs/DSPARK.md 1-2 "
            "and 5, not from); docs/DSPARK.md\nsection 1 step 6; docs/DSPARK.md 4's target")
    assert markdown_refs(text) == ["docs/DSPARK.md", "bench/README.md", "docs/DSPARK.md",
                                   "docs/DSPARK.md", "docs/DSPARK.md", "docs/DSPARK.md"]
    assert [numbers for _, numbers, _ in section_refs(text)] == [
        ["1.3", "1.4"], ["3"], ["1", "2", "5"], ["1.6"], ["4"]]
    assert not resolves("docs/NO_SUCH_NOTE" + ".md", tmp_path / "x.py")
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n## 1. One\n### 1.2 Two\n## 3 Three\nAlgorithm 1 here\n")
    assert headings(doc) == {"1", "1.2", "3"}
    assert label_in(("Alg.", "1"), doc.read_text())
    assert not label_in(("Appendix", "A"), doc.read_text())


def test_the_scan_covers_code_docs_and_deploy_files():
    names = {str(p.relative_to(ROOT)) for p in scanned_files()}
    assert "README.md" in names and "pyproject.toml" in names
    assert any(n.startswith("worker/engine/") for n in names)
    assert any(Path(n).name.startswith("Dockerfile") for n in names)


# -- the repository ----------------------------------------------------------------------------
def test_design_notes_are_in_the_repository():
    for name in ("docs/ARCHITECTURE.md", "docs/DSPARK.md", "CONTRIBUTING.md", "LICENSE"):
        assert (ROOT / name).is_file(), f"{name} is missing"


def test_every_cited_markdown_file_exists():
    missing = sorted({f"{p.relative_to(ROOT)}: {ref}" for p in scanned_files()
                      for ref in markdown_refs(p.read_text(encoding="utf-8", errors="replace"))
                      if not resolves(ref, p)})
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", ["docs/DSPARK.md", "docs/ARCHITECTURE.md"])
def test_cited_sections_and_labels_exist(doc):
    path = ROOT / doc
    if not path.is_file():
        pytest.fail(f"{doc} is missing")
    numbers, text = headings(path), path.read_text(encoding="utf-8")
    problems = []
    for p in scanned_files():
        citing = p.read_text(encoding="utf-8", errors="replace")
        for cited, sections, window in section_refs(citing):
            if cited != doc:
                continue
            where = f"{p.relative_to(ROOT)}: {cited}"
            problems += [f"{where} section {n}: no such heading" for n in sections
                         if n not in numbers]
            problems += [f"{where}: {' '.join(label)} is not in {doc}"
                         for label in LABEL.findall(window) if not label_in(label, text)]
    assert not problems, "\n".join(sorted(set(problems)))
