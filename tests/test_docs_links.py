"""The README and the docs stand alone and their links work, read as GitHub renders them: every relative
link and image in ``README.md`` and ``docs/**/*.md`` names a file in the repository, an anchor names a heading
of its page, and no page cites a file outside the repository.  The README stays short enough to decide on in
one screen: at most 220 lines, with a picture in its first 30.  (``mkdocs build --strict`` in ``.ci/run``
checks the site on top.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    slugs, seen = set(), {}
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        s = github_slug(h)
        n = seen.get(s, 0)
        slugs.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return slugs


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return LINK.findall(text) + HTML_SRC.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http(s):, mailto:, ...
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_no_page_or_source_cites_a_file_outside_the_repository():
    cited = []
    for path in [*PAGES, *ROOT.glob("mcm/**/*.py"), *ROOT.glob("modalities/*.py"), *ROOT.glob("datamodules/*.py"),
                 *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("experiments/**/*.yaml"),
                 *ROOT.glob("mcm/weights/**/README.md")]:
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        for needle in ("design.md", "../shared", "review.md", "style.md"):
            if needle in text:
                cited.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not cited, cited


def test_the_readme_decides_in_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, len(lines)
    first_image = next(i for i, line in enumerate(lines) if re.search(r"!\[[^\]]*\]\(|<img ", line))
    assert first_image < 30, first_image


def test_the_slug_matches_github():
    assert github_slug("The README's main job, as written") == "the-readmes-main-job-as-written"
    assert github_slug("Cached latents and cached base predictions (`mcm data encode`)") == \
        "cached-latents-and-cached-base-predictions-mcm-data-encode"
    assert github_slug("Equal wall-clock: MCM against ControlNet and T2I-Adapter") == \
        "equal-wall-clock-mcm-against-controlnet-and-t2i-adapter"
