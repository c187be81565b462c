"""MkDocs hook: links from a page to repository files outside docs/ (`../configs/merge/ties.yaml`).

On GitHub these relative links open the file. The site holds only docs/, so each such link whose target exists in
the repository becomes a link to it under `repo_url` (`blob/main/...`) when mkdocs.yml sets one, else its text
alone. A target that does not exist is left as written, so `mkdocs build --strict` reports it as a broken link.
"""

import posixpath
import re
from pathlib import Path

LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    repo_url = config.get("repo_url")

    def rewrite(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return match.group(0)
        path = (docs / posixpath.dirname(page.file.src_uri) / target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(root) or not path.exists():
            return match.group(0)
        if repo_url:
            return f"[{text}]({repo_url.rstrip('/')}/blob/main/{path.relative_to(root).as_posix()})"
        return text

    return LINK.sub(rewrite, markdown)
