"""Write the option tables of docs/cli.md from the argparse parsers of the `attend-robust` command.

    python scripts/cli_reference.py          # rewrite the tables in docs/cli.md
    python scripts/cli_reference.py --check  # exit with status 1 when the page differs from the parsers

Each subcommand's table sits between the lines `<!-- cli-options: NAME -->` and
`<!-- /cli-options: NAME -->` of the page. Only the text between those markers is rewritten.
tests/test_docs.py fails when the page and the parsers differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE = REPO_ROOT / "docs" / "cli.md"
SUBCOMMANDS = ("attack", "finetune", "plot")
# argparse's own names for the groups of arguments that were added without a group.
DEFAULT_GROUP_TITLES = {"positional arguments": "Arguments", "options": "Options", "optional arguments": "Options"}


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Return the parser of every `attend-robust` subcommand, by name."""
    sys.path.insert(0, str(REPO_ROOT))
    from attend_robust.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("The attend-robust parser has no subcommands.")


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Return the parser's arguments in the order of its help, without `--help`."""
    return [
        action
        for group in parser._action_groups
        for action in group._group_actions
        if not isinstance(action, argparse._HelpAction)
    ]


def argument_name(action: argparse.Action) -> str:
    if action.option_strings:
        return max(action.option_strings, key=len)
    metavar = action.metavar or action.dest.upper()
    return f"{metavar} ..." if action.nargs in ("+", "*") else metavar


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"
    if action.default is None:
        return "not set"
    return f"`{action.default}`"


def _cell(text: str) -> str:
    # Escaped so that Markdown keeps help text such as `train.<ext>` and `a|b` inside the table cell.
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def render_options(parser: argparse.ArgumentParser) -> str:
    """Render a parser's arguments as one Markdown table per argument group."""
    sections = []
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        title = DEFAULT_GROUP_TITLES.get(group.title, group.title[:1].upper() + group.title[1:])
        rows = ["| Option | Default | Description |", "|---|---|---|"]
        for action in actions:
            description = action.help or ""
            if action.choices:
                description += " Choices: " + ", ".join(f"`{choice}`" for choice in action.choices) + "."
            rows.append(f"| `{argument_name(action)}` | {_default(action)} | {_cell(description)} |")
        sections.append(f"### {title}\n\n" + "\n".join(rows))
    return "\n\n".join(sections)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- cli-options: {name} -->", f"<!-- /cli-options: {name} -->"


def updated_page(text: str, parsers: dict[str, argparse.ArgumentParser]) -> str:
    """Return `text` with the table of every subcommand in `parsers` regenerated between its markers."""
    for name, parser in parsers.items():
        start, end = _markers(name)
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), flags=re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"The page has no '{start}' ... '{end}' block for the {name!r} subcommand. Add one.")
        text = pattern.sub(lambda _: f"{start}\n\n{render_options(parser)}\n\n{end}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description="Write or check the option tables of docs/cli.md.")
    arguments.add_argument("--check", action="store_true", help="Compare only, and exit with status 1 on a difference.")
    options = arguments.parse_args(argv)

    current = PAGE.read_text(encoding="utf-8")
    expected = updated_page(current, subcommand_parsers())
    if options.check:
        if current != expected:
            print(f"{PAGE} differs from the parsers. Run: python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
