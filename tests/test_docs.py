"""The manual: every page is reachable from the README, and every relative link points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def _links(page: Path) -> list[Path]:
    return [(page.parent / target).resolve() for target in LINK.findall(page.read_text()) if "://" not in target]


def test_every_page_of_the_manual_is_reachable_from_the_readme() -> None:
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        for target in _links(page):
            assert target.is_file(), f"{page.relative_to(ROOT)} links to a missing {target}"
            if target not in seen:
                seen.add(target)
                todo.append(target)
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")}
    assert pages <= seen, sorted(str(p.relative_to(ROOT)) for p in pages - seen)


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
