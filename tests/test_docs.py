"""README tells the truth: every command and every `serve` flag of both programs is in it."""

import argparse
import re
from pathlib import Path

import pytest

import dispatch_broker
import dispatch_plugin

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(full command, parser) for every leaf subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, f"{prefix}{name} ") if any(
                    isinstance(a, argparse._SubParsersAction) for a in sub._actions) else [(f"{prefix}{name}", sub)]


COMMANDS = [("dist/plugin.pyz", c, p) for c, p in subcommands(dispatch_plugin.parser())] + \
           [("dist/broker.pyz", c, p) for c, p in subcommands(dispatch_broker.parser())]


@pytest.mark.parametrize("pyz, command, parser", COMMANDS, ids=[f"{z.split('/')[1]} {c}" for z, c, _ in COMMANDS])
def test_every_command_is_in_readmes_cli_table_with_its_usage(pyz, command, parser):
    rows = [line for line in README.splitlines() if line.startswith(f"| `python3 {pyz} {command}")]
    assert rows, f"README's CLI table has no row for `python3 {pyz} {command}`"
    positionals = [a.metavar or a.dest for a in parser._actions if not a.option_strings and a.dest != "help"]
    for positional in positionals:  # BODY, BASE, ID: the row shows what the command takes
        assert positional.upper() in rows[0], f"README's row for {command} does not show {positional.upper()}"


def test_every_serve_flag_and_its_environment_variable_is_in_readmes_settings_table():
    serve = dict(subcommands(dispatch_broker.parser()))["serve"]
    flags = [a.option_strings[-1] for a in serve._actions if a.option_strings and a.dest not in ("help", "verbose")]
    table = [line for line in README.splitlines() if line.startswith("| `--")]
    for flag in flags:
        assert any(f"`{flag}`" in row for row in table), f"{flag} is not in README's settings table"
        env = "DISPATCH_" + flag.lstrip("-").replace("-", "_").upper()
        if flag not in ("--dev", "--allowed-host"):
            assert any(env in row for row in table if f"`{flag}`" in row), f"{env} is not beside {flag}"


def test_every_plugin_environment_variable_is_in_readme():
    for name in [var for _, var in dispatch_plugin.SETTINGS] + [dispatch_plugin.ENV_LOG]:
        assert f"`{name}`" in README
    for key, _ in dispatch_plugin.SETTINGS:  # and each config.toml key
        assert f"`{key}`" in README


def test_readme_lists_every_broker_tool():
    tools = re.findall(r"^\| `([\w.]+)\(", README, flags=re.M)
    assert set(tools) == {tool.decode() for tool in dispatch_broker.ANSWERED_TOOLS} | {"listen"}
