"""What `nbdask --version` and every `--help` show a person."""

import pytest

import nbdask
from nbdask.cli import COMMANDS, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr()
    assert exit_.value.code == 0 and out.out == f"nbdask {nbdask.__version__}\n" and out.err == ""


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_ends_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"] if command is None else [command, "--help"])
    out = capsys.readouterr()
    assert exit_.value.code == 0 and out.err == ""
    lines = out.out.rstrip("\n").split("\n")
    start = max(i for i, line in enumerate(lines) if line.startswith("example"))
    example = [line for line in lines[start + 1:] if line.startswith("  nbdask ")]
    assert example, out.out
    assert "``" not in out.out  # reStructuredText quoting is for docstrings, not for a terminal
    if command is not None:
        assert all(line.startswith(f"  nbdask {command}") for line in example)
        assert lines[-1].startswith(("  nbdask", "      --")), lines[-1]


def test_every_positional_argument_says_what_it_takes():
    import argparse

    from nbdask.cli import _parser

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    yield from walk(child, f"{name} {sub}")
            elif not action.option_strings and action.dest != "help":
                yield f"{name} {action.dest}", action.help

    missing = [where for where, text in walk(_parser(), "nbdask") if not text]
    assert missing == []
