"""Print the README's command reference (every gpt2kit subcommand, flag, default and help) from the parser
itself, so the README cannot drift from the CLI; tests/test_readme.py checks that it has not.

    python tools/readme_usage.py > /tmp/usage.md   # then paste between the usage markers of README.md
"""
from __future__ import annotations

import argparse

from gpt2kit.cli import build_parser

FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


def subcommands() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def visible_actions(sp):
    return [a for a in sp._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def render() -> str:
    out = []
    for name, sp in subcommands().items():
        first = (sp.description or "").split(". ")[0].rstrip(".")
        out += [f"**`gpt2kit {name}`**: {first}.", "", "| flag | default | what |", "|---|---|---|"]
        for a in visible_actions(sp):
            flags = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.dest.upper()}`"
            default = "" if a.default is None or isinstance(a, FLAG_ACTIONS) else f"`{a.default}`"
            text = " ".join((a.help or "").replace("%(default)s", str(a.default)).split()).replace("|", "\\|")
            out.append(f"| {flags} | {default} | {text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
