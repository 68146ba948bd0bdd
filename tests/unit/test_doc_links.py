"""Every link in README.md and docs/*.md resolves to a file (and heading) the repository holds, and no file
points outside the repository (the design card and style guide are copied into docs/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_doc_link_resolves() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts/check_doc_links.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_file_points_outside_the_repository() -> None:
    done = subprocess.run(["git", "grep", "-n", "-e", "../shared/", "-e", "../seeds/", "--", "*.py", "*.md", "*.yaml",
                           "*.sh", ":!docs/results"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    hits = [line for line in done.stdout.splitlines() if "test_doc_links.py" not in line]
    assert hits == [], "\n".join(hits)
