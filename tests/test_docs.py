"""Docstrings, comments and docs cite only files a reader of the repository can open.

The project's design notes live outside the repository; what users and contributors need from
them is in docs/ (evaluation, datasets, quality, performance). These tests scan the text of every
.py and .md file (no imports, no subprocesses) and fail on:
- a citation of one of the outside design notes, or of a path into the shared folder beside
  the repository;
- a path to a docs/ page (or to a page under a docs/ subfolder) that does not exist.
Skipped: hidden folders (.git, caches), `__pycache__`, `*.egg-info`, the git-ignored output
folders `runs/`, `build/` and `records/<dataset>/`, and, for the first check only,
`docs/results/` (dated reports of past sessions).
"""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join("docs", "results")
SKIPPED_DIRS = {"runs", "build"}
DOCS_PAGES = ("evaluation", "datasets", "quality", "performance")

# Names of the design notes that are not in the repository. The patterns are assembled from parts
# so that this file does not cite them itself.
_OUTSIDE_NOTES = ("ARCHITECTURE", "DATASETS", "EVALUATION", "METHODS", "QUALITY", "STYLE",
                  "TOOLCHAIN")
_OUTSIDE_PATHS = ("../" + "shared/", "shared/" + "design")
OUTSIDE_CITATION = re.compile(
    r"\b(?:" + "|".join(_OUTSIDE_NOTES) + r")\.md\b|"
    + "|".join(re.escape(path) for path in _OUTSIDE_PATHS))
# docs/<name>.md or docs/<folder>/<name>.md, not preceded by another path character.
DOCS_PATH = re.compile(r"(?<![\w./-])docs/(?:[\w-]+/)*[\w-]+\.md\b")


def _text_files():
    """(path relative to the repository, text) of every scanned .py and .md file."""
    for folder, subfolders, names in os.walk(ROOT):
        relative = os.path.relpath(folder, ROOT)
        subfolders[:] = sorted(
            name for name in subfolders
            if not name.startswith(".") and name != "__pycache__"
            and not name.endswith(".egg-info")
            and not (relative == "." and name in SKIPPED_DIRS)
            and relative != "records")  # records/<dataset>/: generated, git-ignored
        for name in sorted(names):
            if name.endswith((".py", ".md")):
                path = os.path.normpath(os.path.join(relative, name))
                with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
                    yield path, f.read()


def _matches(pattern, files):
    """'path:line: cited text' for every match of `pattern` in `files`."""
    found = []
    for path, text in files:
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((path, line, match.group(0)))
    return found


@pytest.fixture(scope="module")
def files():
    return list(_text_files())


def test_scan_sees_the_repository(files):
    paths = {path for path, _ in files}
    assert "README.md" in paths and os.path.join("tfseg", "evaluate.py") in paths, sorted(paths)


def test_no_citation_of_design_notes_outside_the_repository(files):
    scanned = [(p, t) for p, t in files if not p.startswith(RESULTS_DIR + os.sep)]
    found = _matches(OUTSIDE_CITATION, scanned)
    assert not found, (
        "These lines cite design notes that are not in the repository; cite the matching page "
        "of docs/ (evaluation.md, datasets.md, quality.md, performance.md) or drop the "
        "reference:\n" + "\n".join(f"  {p}:{n}: {m}" for p, n, m in found))


def test_every_cited_docs_page_exists(files):
    missing = [(p, n, m) for p, n, m in _matches(DOCS_PATH, files)
               if not os.path.isfile(os.path.join(ROOT, m))]
    assert not missing, (
        "These lines cite docs/ pages that do not exist; fix the path or write the page:\n"
        + "\n".join(f"  {p}:{n}: {m}" for p, n, m in missing))


@pytest.mark.parametrize("page", DOCS_PAGES)
def test_docs_page_exists_and_is_linked_from_the_readme(page):
    path = os.path.join(ROOT, "docs", f"{page}.md")
    assert os.path.isfile(path), f"docs/{page}.md is missing"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert f"(docs/{page}.md)" in f.read(), f"README.md does not link docs/{page}.md"


def test_patterns_catch_what_they_should():
    assert OUTSIDE_CITATION.search("see " + "TOOLCHAIN" + ".md §4")
    assert OUTSIDE_CITATION.search("background: `" + "../" + "shared/notes/x.md`")
    assert not OUTSIDE_CITATION.search("see docs/datasets.md and docs/quality.md")
    nested = "docs/" + "results/some_report.md"  # assembled: the scan must not see it here
    assert [m.group(0) for m in DOCS_PATH.finditer(
        f"(docs/evaluation.md), {nested}; my{nested}, docs/*.md")] == [
            "docs/evaluation.md", nested]
