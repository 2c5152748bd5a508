"""`benchmarks/load.py` rewrites only its own README section, keeping the marker of the section after it."""

from __future__ import annotations

from benchmarks.loadtest.report import write_section

README = """# Benchmarks

## Load

old numbers

<!-- system-benchmark:begin (written by benchmarks/system.py --full; edit the script) -->
## System

system numbers
"""


def test_write_section_replaces_its_section_and_keeps_the_next_sections_marker(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)

    write_section(readme, "## Load\n\nnew numbers\n")

    text = readme.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert "<!-- system-benchmark:begin" in text and text.index("new numbers") < text.index("<!--")
    assert text.endswith("## System\n\nsystem numbers\n")


def test_write_section_appends_when_the_readme_has_none(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")

    write_section(readme, "## Load\n\nnumbers\n")

    assert readme.read_text() == "# Benchmarks\n\n## Load\n\nnumbers\n"
