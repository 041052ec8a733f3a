"""The README stays a short entry, and every relative link of the README and the documentation
pages points to a file that exists, and to a heading of it when it names one (mkdocs build
--strict, run by make test, checks the rest)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(page: Path) -> str:
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def anchors(page: Path) -> set[str]:
    """The ids mkdocs gives the page's headings (Python-Markdown's toc slugify)."""
    titles = re.findall(r"^#{1,6} (.+)$", prose(page), flags=re.M)
    ascii_titles = (unicodedata.normalize("NFKD", t).encode("ascii", "ignore").decode() for t in titles)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", t).strip().lower()) for t in ascii_titles}


def test_the_readme_is_a_short_entry() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference material into docs/"
    assert "Research use only" in "\n".join(lines[:20])


def test_every_relative_link_points_to_a_file() -> None:
    broken = [
        f"{page.relative_to(ROOT)} -> {target}"
        for page in PAGES
        for target in relative_links(page)
        if not (page.parent / target.split("#")[0]).exists()
    ]
    assert not broken, broken


def test_every_linked_heading_exists() -> None:
    linked = [
        (page, *target.split("#", 1)) for page in PAGES for target in relative_links(page) if "#" in target
    ]
    broken = [
        f"{page.relative_to(ROOT)} -> {file}#{anchor}"
        for page, file, anchor in linked
        if file.endswith(".md") and anchor not in anchors(page.parent / file)
    ]
    assert not broken, broken


def test_every_page_is_in_the_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    listed = {next(iter(entry.values())) for entry in config["nav"]}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}


def test_every_method_is_in_the_readme_and_the_baselines_page() -> None:
    from savlt.methods import METHODS

    for page in (ROOT / "README.md", ROOT / "docs" / "baselines.md"):
        text = page.read_text()
        missing = [name for name in METHODS if f"`{name}`" not in text]
        assert not missing, f"{page.name} does not list {missing}"
