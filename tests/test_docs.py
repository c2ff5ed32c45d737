"""Tests of the documentation site: a strict mkdocs build, and every Python example in docs/ runs."""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO_ROOT / "docs"
SKIP_MARKER = "<!-- skip-test -->"

# A fenced ```python block, with the line before it so that a skip marker can be seen.
CODE_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", flags=re.DOTALL)


def _python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """Return `(line number, code, skipped)` for each ```python block of `page`."""
    text = "\n" + page.read_text(encoding="utf-8")
    blocks = []
    for match in CODE_BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) - 1
        blocks.append((line, match.group("code"), match.group("before").strip() == SKIP_MARKER))
    return blocks


def _pages_with_python() -> list[Path]:
    return sorted(page for page in DOCS_DIR.glob("*.md") if _python_blocks(page))


def _has_docs_tools() -> bool:
    return all(importlib.util.find_spec(name) for name in ("mkdocs", "material", "mkdocstrings_handlers"))


@pytest.mark.skipif(not _has_docs_tools(), reason="mkdocs, mkdocs-material or mkdocstrings[python] is not installed")
def test_mkdocs_build_strict(tmp_path):
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "api/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "attend_robust.masked_model.AttentionMaskedModel" in api


def test_docs_have_python_examples():
    pages = {page.name for page in _pages_with_python()}

    assert {"getting-started.md", "metric.md"} <= pages


def test_skip_markers_precede_python_blocks():
    for page in DOCS_DIR.glob("*.md"):
        markers = page.read_text(encoding="utf-8").count(SKIP_MARKER)
        skipped = sum(skip for _, _, skip in _python_blocks(page))
        assert markers == skipped, f"{page.name}: a {SKIP_MARKER} line must come right before a ```python block"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Run examples offline, in a scratch folder, with their own metric cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path / "metrics-cache")
    monkeypatch.chdir(tmp_path)

    original_connect = socket.socket.connect

    def connect_locally_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"documentation examples run offline, but a connection to {address!r} was attempted")
        return original_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect_locally_only)


@pytest.mark.parametrize("page", _pages_with_python(), ids=lambda page: page.name)
def test_docs_examples_run(page, offline):
    """Run a page's Python blocks in order in one namespace, as a reader would paste them."""
    namespace: dict = {"__name__": "__docs_example__"}
    ran = 0
    for line, code, skipped in _python_blocks(page):
        if skipped:
            continue
        location = f"{page.name}, block at line {line}"
        if code.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(code, namespace, location, str(page), line)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
            runner.run(test, clear_globs=False)
            assert runner.failures == 0, f"{location}: doctest failed"
            namespace = test.globs
        else:
            exec(compile(code, location, "exec"), namespace)
        ran += 1

    assert ran > 0
