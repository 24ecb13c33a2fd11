"""The API reference links the docstrings' Hugging Face references (``[`Name`]``), and `mkdocs build --strict`
fails on a reference to nothing (docs/api/crossrefs.py, a griffe extension)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MKDOCS = os.path.join(os.path.dirname(sys.executable), "mkdocs")


def _site(tmp_path, docstring: str) -> subprocess.CompletedProcess:
    """Build a one-page site documenting a stand-in `regtune` package whose function has `docstring`."""
    package = tmp_path / "src" / "regtune"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from .core import Target, documented

            __all__ = ["Target", "documented"]
            """
        )
    )
    (package / "core.py").write_text(
        textwrap.dedent(
            f'''
            class Target:
                """The object referenced."""


            def documented():
                """{docstring}"""
            '''
        )
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# API\n\n::: regtune.Target\n\n::: regtune.documented\n")
    (tmp_path / "mkdocs.yml").write_text(
        textwrap.dedent(
            f"""
            site_name: t
            plugins:
              - mkdocstrings:
                  handlers:
                    python:
                      paths: [src]
                      options:
                        extensions:
                          - {os.path.join(ROOT, "docs", "api", "crossrefs.py")}:HFCrossReferences
            """
        )
    )
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [MKDOCS, "build", "--strict"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_references_link_and_a_broken_one_fails_the_strict_build(tmp_path):
    good = _site(tmp_path / "good", "Returns a [`Target`] (also [`~regtune.core.Target`]).")
    assert good.returncode == 0, good.stderr
    html = (tmp_path / "good" / "site" / "index.html").read_text()
    assert 'href="#regtune.Target"' in html or 'href="#regtune.core.Target"' in html
    assert "[<code>" not in html
    broken = _site(tmp_path / "broken", "Returns a [`Nothing`].")
    assert broken.returncode != 0
    assert "Could not find cross-reference target 'regtune.core.Nothing'" in broken.stderr
