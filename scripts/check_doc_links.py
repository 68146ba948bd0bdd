"""Check that every markdown link in README.md and docs/*.md resolves to a file (and heading) in the repo.

    .venv/bin/python scripts/check_doc_links.py [FILE.md ...]   # exit 0: all resolve; 1: prints the broken

Images count as links; http(s) and mailto links are skipped. A `#anchor` must match a heading of the
target file, slugged as GitHub does (lower case; punctuation other than `-` and `_` dropped; spaces -> `-`).
Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading text."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (headings inside code fences are not headings)."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of each markdown link outside code fences."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out += [(n, m.group(1)) for m in LINK.finditer(line)]
    return out


def broken(path: Path) -> list[str]:
    """One message per link of `path` that does not resolve."""
    problems = []
    for n, target in links(path):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif REPO not in dest.parents and dest != REPO:
            problems.append(f"{where}: outside the repository")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor}")
    return problems


def main(argv: list[str]) -> int:
    files = [Path(a).resolve() for a in argv] or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    problems = [p for f in files for p in broken(f)]
    count = sum(len(links(f)) for f in files)
    print("\n".join(problems) if problems else f"{count} links in {len(files)} files: all resolve")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
