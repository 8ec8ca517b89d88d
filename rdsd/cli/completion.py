"""Shell completion for ``rdsd`` and ``rdsft``, generated from the argparse
parsers by ``shtab``: the script always matches the commands it completes,
because it is made from the same parser that parses them."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from types import ModuleType
from typing import Any

# ``shtab`` (which reads installed packages' metadata) is imported when a
# script is printed, not by every command that builds the parser.
SHELLS = ("bash", "zsh")
# Options whose values are paths, so the shell completes files or directories.
_DIRECTORIES = {"home", "src"}
_FILES = {"bundle", "out"}


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _actions(sub)


def _list_every_subcommand(parser: argparse.ArgumentParser) -> None:
    """shtab completes only subcommands that argparse lists in help (those
    added with ``help=``); list the others too, for this process only (it
    prints the script and exits), so every command completes."""
    for action in _actions(parser):
        if not isinstance(action, argparse._SubParsersAction):
            continue
        listed = {a.dest for a in action._choices_actions}
        for name, sub in action.choices.items():
            if name not in listed:
                help_text = sub.description or name
                action._choices_actions.append(action._ChoicesPseudoAction(name, (), help_text))


def _mark_paths(parser: argparse.ArgumentParser, shtab: ModuleType) -> None:
    """Have the shell complete directories and files for path options."""
    for action in _actions(parser):
        if action.dest in _DIRECTORIES:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        elif action.dest in _FILES:
            action.complete = shtab.FILE  # type: ignore[attr-defined]


def add_completion(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add ``PROG completion bash|zsh`` to ``parser`` (``sub`` is its
    subparsers object); path options are marked for the shell when the
    script is made."""
    comp = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description=(
            f"Print a completion script for {parser.prog}. bash: "
            f'eval "$({parser.prog} completion bash)" in ~/.bashrc; zsh: '
            f"{parser.prog} completion zsh > ~/.zfunc/_{parser.prog} with ~/.zfunc on fpath."
        ),
    )
    comp.add_argument("shell", choices=SHELLS, help="the shell to print a completion script for")

    def run(args: argparse.Namespace) -> int:
        import shtab

        _mark_paths(parser, shtab)
        _list_every_subcommand(parser)
        print(shtab.complete(parser, shell=args.shell), end="")
        return 0

    comp.set_defaults(fn=run)
