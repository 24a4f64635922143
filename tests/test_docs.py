"""The commands the README and docs/ show still work: every `fgray ...` and
`python studies/<script>.py ...` command in a fenced block is parsed by the parser that runs it
(a renamed or removed flag, subcommand or choice fails here), and every flag a synopsis
(`[--flag ...]`) names exists on its command. Nothing is run: what the commands do is tested
where it is built (test_studies, test_engine, test_results_*, ...).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from fgray.cli import build_parser
from fgray.errors import UserError
from fgray.tune.cli import build_parser as study_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The pages whose fenced blocks hold runnable commands: a page that loses all of them (a block
# moved, a fence broken) fails `test_the_pages_still_show_their_commands`.
WITH_COMMANDS = {"README.md", "docs/methods.md", "docs/studies.md", "docs/results.md",
                 "docs/clusters.md"}
WITH_SYNOPSIS = {"docs/configuration.md"}


def fenced_commands(text: str) -> list[tuple[str, bool]]:
    """The `fgray` and `python studies/...` commands in the fenced blocks of `text`, one string
    each: a line ending in a backslash or followed by indented lines continues, a `#` comment
    ends it, `a && b` is two commands, and `ray job submit ... -- CMD` is CMD. With each, whether
    its block is a synopsis (one of its commands has `[optional]` parts: the block's other
    lines hold placeholders such as FMT, not values)."""
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        joined: list[str] = []
        for line in block.splitlines():
            if joined and (joined[-1].endswith("\\") or line.startswith((" ", "\t"))):
                joined[-1] = joined[-1].rstrip("\\").rstrip() + " " + line.strip()
            else:
                joined.append(line.strip())
        commands = []
        for line in joined:
            line = re.sub(r"\s+#.*$", "", line)
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("ray job submit") and " -- " in part:
                    part = part.split(" -- ", 1)[1].strip()
                if part.startswith("fgray ") or part.startswith("python studies/"):
                    commands.append(part)
        synopsis = any("[" in c for c in commands)
        out += [(c, synopsis) for c in commands]
    return out


def _all_commands() -> list[tuple[str, str, bool]]:
    return [(str(page.relative_to(REPO)), command, synopsis) for page in DOCS
            for command, synopsis in fenced_commands(page.read_text())]


def _study_mode(script: str) -> str:
    source = (REPO / script).read_text()
    found = re.search(r'mode="(\w+)"', source)
    return found.group(1) if found else "search"


def _parser_and_args(command: str) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser that runs `command` and the arguments it receives."""
    words = shlex.split(command)
    if words[0] == "fgray":
        return build_parser(), words[1:]
    script = words[1]
    assert (REPO / script).is_file(), f"{script}: no such study script"
    return study_parser(Path(script).name, "", mode=_study_mode(script)), words[2:]


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser of `fgray data synth ...` and the like: subcommands followed down."""
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def test_the_pages_still_show_their_commands():
    pages = {page for page, _, _ in _all_commands()}
    runnable = {page for page, _, synopsis in _all_commands() if not synopsis}
    synopses = {page for page, _, synopsis in _all_commands() if synopsis}
    assert WITH_COMMANDS <= runnable, WITH_COMMANDS - runnable
    assert WITH_SYNOPSIS <= synopses, WITH_SYNOPSIS - synopses
    assert pages <= {str(p.relative_to(REPO)) for p in DOCS}


@pytest.mark.parametrize("page, command", [
    pytest.param(page, command, id=f"{page}: {command[:60]}")
    for page, command, synopsis in _all_commands() if not synopsis])
def test_a_documented_command_parses(page, command):
    parser, args = _parser_and_args(command)
    try:  # fgray's parsers raise a UserError (one line, exit 2) where argparse would exit
        parser.parse_args(args)
    except (UserError, SystemExit) as exc:
        pytest.fail(f"{page}: `{command}` no longer parses: {exc}")


@pytest.mark.parametrize("page, command", [
    pytest.param(page, command, id=f"{page}: {command[:60]}")
    for page, command, synopsis in _all_commands() if synopsis])
def test_a_synopsis_names_only_real_flags(page, command):
    parser, args = _parser_and_args(command.replace("[", " ").replace("]", " "))
    parser = _subparser(parser, [a for a in args if not a.startswith("-")])
    known = {s for action in parser._actions for s in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", command))
    assert named, command
    assert named <= known, f"{page}: `{command}` names {sorted(named - known)}"


def test_a_broken_command_is_caught():
    """The check is not vacuous: a flag that does not exist fails to parse."""
    parser, args = _parser_and_args("fgray results STUDY --format tabel")
    with pytest.raises(UserError, match="invalid choice: 'tabel'"):
        parser.parse_args(args)
    text = "```bash\nfgray pretrain --method moco \\\n    --dataset cub  # a comment\n```\n"
    assert fenced_commands(text) == [("fgray pretrain --method moco --dataset cub", False)]
