"""mkdocs hook: pages whose text is generated when the site builds, so they cannot go stale.

``cli.md`` holds ``{{ cli_reference }}``: replaced by ``mcm.cli.reference.markdown()`` (every command's
``--help`` from the parsers themselves).
"""
from __future__ import annotations


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "{{ cli_reference }}" in markdown:
        from mcm.cli.reference import markdown as cli_markdown

        markdown = markdown.replace("{{ cli_reference }}", cli_markdown())
    return markdown
