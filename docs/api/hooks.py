"""mkdocs hook: a docs page's relative link to a repository file outside docs/ (a recipe, a bench script, a results
file) points to that file on GitHub in the site, as it does when the page is read on GitHub. Links between pages,
and links to files that exist nowhere, are left to mkdocs' strict link check."""

from __future__ import annotations

import os
import posixpath
import re


LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    docs_dir = config["docs_dir"]
    root = os.path.dirname(os.path.abspath(docs_dir))
    base = config.get("repo_url", "").rstrip("/") + "/blob/main/"
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match):
        target, anchor = match.group(1), match.group(2) or ""
        in_repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if in_repo.startswith("docs/") or in_repo.startswith("..") or not os.path.exists(os.path.join(root, in_repo)):
            return match.group(0)
        return f"]({base}{in_repo}{anchor})"

    return LINK.sub(rewrite, markdown)
