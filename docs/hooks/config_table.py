"""mkdocs hook: the configuration page's key table, generated from the config's field metadata."""

from savlt.config import reference_markdown

MARKER = "<!-- config-table -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, reference_markdown()) if MARKER in markdown else markdown
