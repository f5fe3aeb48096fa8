"""The README and docs/: every relative link resolves, to a file and, with a #fragment, to a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for line in FENCE.sub("", markdown).splitlines():
        match = re.match(r"#+\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def relative_links(markdown: str) -> list[str]:
    """Link targets outside code blocks that are neither URLs nor mail addresses."""
    return [target for target in LINK.findall(FENCE.sub("", markdown)) if not re.match(r"[a-z]+:", target)]


def test_the_anchor_rule_matches_githubs():
    anchors = heading_anchors("## Training (`atkd train CONFIG [--stage finetune|distill]`)\n")
    assert anchors == {"training-atkd-train-config---stage-finetunedistill"}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_resolves(document: Path):
    text = document.read_text()
    broken = []
    for target in relative_links(text):
        path_part, _, fragment = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{target}: no such file in the repository")
        elif fragment and linked.suffix == ".md" and fragment not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{document.name}: " + "; ".join(broken)


def test_the_readme_stays_short():
    """The README is the newcomer's page; the reference lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
