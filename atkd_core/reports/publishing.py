"""Reports as the UIs show them: Markdown whose figures travel inside it, and a self-contained HTML.

A Markdown report links its figures by file name (``![scores](scores.png)``), which renders in a
checkout but not in a Prefect Markdown artifact or MLflow's artifact viewer, where the link has no
file beside it. These put the PNG bytes in the document itself (base64 ``data:`` URIs).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")

HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
</style></head><body>
{body}
</body></html>
"""


def png_data_uri(path: Path) -> str:
    """The PNG at ``path`` as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def inline_images(markdown: str, directory: Path) -> str:
    """``markdown`` with every PNG it links by a path relative to ``directory`` embedded as a data
    URI (links to files that do not exist are left as they are)."""

    def embed(match: re.Match[str]) -> str:
        path = directory / match.group(2)
        return f"![{match.group(1)}]({png_data_uri(path)})" if path.is_file() else match.group(0)

    return _IMAGE_LINK.sub(embed, markdown)


def write_html(markdown: str, directory: Path, title: str, name: str = "report.html") -> Path:
    """A self-contained HTML rendering of ``markdown`` (tables, figures inlined) in ``directory``."""
    import markdown as markdown_lib

    body = markdown_lib.markdown(inline_images(markdown, directory), extensions=["tables"])
    path = directory / name
    path.write_text(HTML_PAGE.format(title=title, body=body), encoding="utf-8")
    return path
