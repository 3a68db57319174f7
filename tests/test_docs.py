"""The README and the docs site's sources: quick checks that need no MkDocs (CI builds the
site itself with ``mkdocs build --strict``; tests/test_example_plugin.py checks that the plugin
guide names every hook)."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def test_readme_is_short_and_keeps_the_test_command():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    start, end = lines.index("<!-- test-command -->"), lines.index("<!-- /test-command -->")
    command = [line for line in lines[start + 1:end] if not line.startswith("```")]
    assert len(command) == 1 and "pytest" in command[0]
    assert any("vibench run recipes/coin.yaml" in line for line in lines[:start])


def _pages(nav):
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            yield from _pages(value)
        else:
            yield value


def test_the_nav_lists_every_page_and_only_pages_that_exist():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = list(_pages(config["nav"]))
    assert len(listed) == len(set(listed))
    on_disk = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    assert set(listed) == on_disk
