"""The project documents its own method: no citation points outside the repository, and every
"docs/method.md §N" cited names a section that docs/method.md has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SCANNED = ("src", "configs", "docs", "benchmarks", "README.md", "data/README.md")
FORBIDDEN = ("BRAINIT.md", "../shared")
SECTION = r"§\d+(?:\.\d+)*"
CITATION = re.compile(rf"docs/method\.md((?:\s*{SECTION})(?:\s*(?:,|–|-|and|or)\s*{SECTION})*)")
HEADING = re.compile(r"^#{2,}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def tracked(*paths: str) -> list[Path]:
    """Tracked files under ``paths`` (git), or every file there when the tree is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, check=True
        ).stdout
        files = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        for p in paths:
            path = ROOT / p
            files += [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return [f for f in files if f.is_file()]


def text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files (images, checkpoints) cite nothing


def test_no_citation_outside_the_repository():
    bad = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in tracked(*SCANNED)
        if (content := text(f)) is not None
        for n, line in enumerate(content.splitlines(), 1)
        if any(s in line for s in FORBIDDEN)
    ]
    assert not bad, "cite docs/method.md or the paper instead:\n" + "\n".join(bad)


def test_cited_method_sections_exist():
    sections = set(HEADING.findall(METHOD.read_text(encoding="utf-8")))
    assert {str(n) for n in range(1, 10)} <= sections, f"docs/method.md has the sections {sorted(sections)}"
    missing = [
        f"{f.relative_to(ROOT)}:{content.count(chr(10), 0, m.start()) + 1}: §{n}"
        for f in tracked(*SCANNED, "tests", "Makefile")
        if (content := text(f)) is not None
        for m in CITATION.finditer(content)
        for n in re.findall(r"§(\d+(?:\.\d+)*)", m.group(1))
        if n not in sections
    ]
    assert not missing, "sections cited but not in docs/method.md:\n" + "\n".join(missing)


def test_citation_pattern_reads_ranges_and_lists():
    found = [
        re.findall(r"§(\d+(?:\.\d+)*)", m.group(1))
        for m in CITATION.finditer(
            "x (docs/method.md §4–§5) y docs/method.md §3, §7. z docs/method.md §6.1) w docs/method.md §4. v"
        )
    ]
    assert found == [["4", "5"], ["3", "7"], ["6.1"], ["4"]]
