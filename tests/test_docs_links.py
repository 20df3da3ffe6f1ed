"""Every relative link and image in README.md and docs/**/*.md leads somewhere (#33).

A link's file must exist (relative to the page, as GitHub resolves it), and a ``#anchor`` must be a
heading of the page it points into, slugged as GitHub does. External http(s) and mailto links are not
fetched: this runs offline. Links inside fenced code blocks and inline code are not links.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_SOURCE = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, …


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        opening = FENCE.match(line)
        if opening:
            if fence is None:
                fence = opening.group(1)
            elif opening.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered (code, emphasis and link markup gone),
    lowercased, every character but letters, digits, '_', '-' and spaces dropped, spaces to '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = re.sub(r"(\*\*|__|\*|~~)", "", text)  # emphasis markers (a lone '_' in a word stays, as on GitHub)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The page's heading anchors, a repeated heading's second one with -1, its third -2, as GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image on the page, code excluded."""
    found = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        targets += [m.group(1) for m in HTML_SOURCE.finditer(line)]
        definition = REFERENCE_DEF.match(line)
        if definition:
            targets.append(definition.group(1))
        found += [(number, t) for t in targets]
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per link of ``page`` that leads nowhere: a missing file, an anchor no heading has,
    or a path outside ``root``."""
    problems = []
    anchor_cache: dict[Path, set[str]] = {}
    for number, target in links(page):
        where = f"{page.relative_to(root)}:{number}: {target}"
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page.resolve()
        if not path_part and not anchor:
            problems.append(f"{where}: empty link")
            continue
        if not destination.is_relative_to(root.resolve()):
            problems.append(f"{where}: outside the repository")
            continue
        if not destination.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and destination.suffix == ".md":
            if destination not in anchor_cache:
                anchor_cache[destination] = anchors(destination)
            if anchor not in anchor_cache[destination]:
                problems.append(f"{where}: no heading with anchor #{anchor} in {destination.relative_to(root.resolve())}")
    return problems


def test_the_pages_are_found():
    names = {str(p.relative_to(ROOT)) for p in pages()}
    assert {"README.md", "docs/DESIGN.md", "docs/FORMAT.md", "docs/reference/cluster.md"} <= names


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_leads_somewhere(page):
    assert broken_links(page) == []


def test_the_readme_links_every_reference_page():
    readme = {t.partition("#")[0] for _, t in links(ROOT / "README.md")}
    reference = {f"docs/reference/{p.name}" for p in (ROOT / "docs" / "reference").glob("*.md")}
    assert reference and reference <= readme, sorted(reference - readme)


@pytest.mark.parametrize("heading, anchor", [
    ("Running on a cluster", "running-on-a-cluster"),
    ("student (stage two) — the one training loop", "student-stage-two--the-one-training-loop"),
    ("A real teacher: `make demo-real`", "a-real-teacher-make-demo-real"),
    ("On-policy objectives (`--objective`, issue #25)", "on-policy-objectives---objective-issue-25"),
    ("Across tokenizers (issue #23, `pipeline/text/align.py`, `pipeline/train/cross_*.py`)",
     "across-tokenizers-issue-23-pipelinetextalignpy-pipelinetraincross_py"),
    ("**Bold** and [a link](x.md) and <b>tag</b>", "bold-and-a-link-and-tag"),
    ("Stage 0: α ≥ 1 × 2", "stage-0-α--1--2"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    """The check can fail: each kind of broken link in a small tree is named, and the good ones are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "img").mkdir()
    (tmp_path / "docs" / "img" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section: `code` here\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text("\n".join([
        "# Title",
        "[good file](docs/other.md) [good anchor](docs/other.md#a-section-code-here) [here](#title)",
        "[repeated heading](docs/other.md#twice-1) ![good image](docs/img/a.png) [web](https://example.org/x)",
        "[missing file](docs/gone.md)",
        "[missing anchor](docs/other.md#no-such-section)",
        "[missing local anchor](#nowhere)",
        "![missing image](docs/img/gone.png)",
        "[outside](../elsewhere.md)",
        "`[in code](not/checked.md)`",
        "```",
        "[in a fence](not/checked.md)",
        "```",
        "[ref]: docs/missing-ref.md",
    ]) + "\n")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "docs/gone.md", "docs/other.md#no-such-section", "#nowhere", "docs/img/gone.png", "../elsewhere.md",
        "docs/missing-ref.md"], problems
    assert "no such file" in problems[0] and "no heading with anchor #no-such-section" in problems[1]
    assert "outside the repository" in problems[4]
    page.write_text("[good](docs/other.md#twice) [good](docs/other.md#twice-1)\n")
    assert broken_links(page, root=tmp_path) == []
