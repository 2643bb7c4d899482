"""The repository carries its own documentation: no file points outside it for design notes,
and the documents the README and docstrings point at exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: written in pieces so that this file does not match itself
OUTSIDE = ["../" + "shared", "/work/" + "shared"]


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for name in names:
        path = ROOT / name
        if path.is_file() and path.suffix not in {".png", ".jpg", ".pt", ".bin", ".safetensors"}:
            out.append(path)
    return out


def test_no_file_points_outside_the_repository_for_docs():
    offenders = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="ignore")
        offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders, offenders


def test_the_design_documents_exist_and_references_resolve():
    for doc in ("docs/DESIGN.md", "docs/ALGORITHMS.md"):
        assert (ROOT / doc).stat().st_size > 2000, doc
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)", readme):
        assert (ROOT / target).exists(), target
    assert "docs/DESIGN.md" in readme and "docs/ALGORITHMS.md" in readme


def test_every_rule_has_a_section_in_algorithms():
    from hfoptim.rules import RULES

    text = (ROOT / "docs/ALGORITHMS.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    missing = [name for name in RULES if not any(f"`{name}`" in h for h in headings)]
    assert not missing, f"rules without a section in docs/ALGORITHMS.md: {missing}"
