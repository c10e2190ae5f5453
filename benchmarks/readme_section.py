"""Helpers the benchmark reports share."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_readme_section(start: str, end: str, text: str) -> Path:
    """Replaces the text between the markers ``start`` and ``end`` with ``text`` in the one document
    (README.md or docs/*.md) that holds them; returns that document."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    holders = [doc for doc in documents if start in (content := doc.read_text()) and end in content]
    if len(holders) != 1:
        where = ", ".join(str(doc.relative_to(ROOT)) for doc in holders) or "no document"
        raise SystemExit(f"the markers {start} ... {end} must be in one document; found in {where}")
    doc = holders[0]
    head, rest = doc.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")
    return doc
