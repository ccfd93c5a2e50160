"""Where the plugin's settings come from: the environment, then the plugin's options in Claude
Code, then config.toml (`read_settings`, the one rule), and what an option left unset looks like.

Claude Code 2.1.330 (observed, tests/test_claude_code.py pins it end to end): `${user_config.KEY}`
in .mcp.json's env becomes '' for an option left unset, and hooks then get no
CLAUDE_PLUGIN_OPTION_KEY at all. Neither may hide a setting made elsewhere.
"""

import json
import sys

import pytest

from harness import PLUGIN, ROOT

sys.path.insert(0, str(PLUGIN.parent))
import dispatch_plugin  # noqa: E402

TOKEN_ENV = "dsp_env_" + "1" * 48
TOKEN_OPTION = "dsp_option_" + "2" * 48
TOKEN_FILE = "dsp_file_" + "3" * 48


@pytest.fixture
def config_toml(tmp_path, monkeypatch):
    """write(**settings): a private config.toml where the plugin looks for one."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "dispatch").mkdir(mode=0o700)

    def write(**settings: str) -> str:
        path = tmp_path / "dispatch" / "config.toml"
        path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
        path.chmod(0o600)
        return str(path)

    return write


def test_settings_come_from_the_environment_then_the_plugin_options_then_config_toml(config_toml):
    path = config_toml(url="http://127.0.0.1:3/mcp", token=TOKEN_FILE, name="file")
    options = {"CLAUDE_PLUGIN_OPTION_URL": "http://127.0.0.1:2/mcp", "CLAUDE_PLUGIN_OPTION_TOKEN": TOKEN_OPTION}
    environment = {"DISPATCH_URL": "http://127.0.0.1:1/mcp", "DISPATCH_TOKEN": TOKEN_ENV}
    read = dispatch_plugin.read_settings
    assert read({}) == {"url": "http://127.0.0.1:3/mcp", "url_from": f"url in {path}", "token": TOKEN_FILE,
                        "token_from": f"token in {path}", "name": "file", "name_from": f"name in {path}"}
    both = read(options)
    assert (both["url"], both["url_from"]) == ("http://127.0.0.1:2/mcp", "the plugin's url option")
    assert (both["token"], both["token_from"]) == (TOKEN_OPTION, "the plugin's token option")
    assert both["name"] == "file", "a setting the options do not have still comes from the file"
    every = read({**options, **environment})
    assert (every["url"], every["url_from"], every["token"]) == ("http://127.0.0.1:1/mcp", "DISPATCH_URL", TOKEN_ENV)


@pytest.mark.parametrize("unset", ["", "  ", "${user_config.url}"], ids=["empty", "blank", "unsubstituted"])
def test_a_plugin_option_left_unset_sets_nothing(config_toml, unset):
    """'' is what Claude Code 2.1.330 gives the server for an unset option; an unsubstituted
    reference would be a Claude Code that does not substitute. Neither overrides config.toml."""
    config_toml(url="http://127.0.0.1:3/mcp", token=TOKEN_FILE)
    settings = dispatch_plugin.read_settings({"CLAUDE_PLUGIN_OPTION_URL": unset,
                                              "CLAUDE_PLUGIN_OPTION_TOKEN": unset.replace("url", "token")})
    assert (settings["url"], settings["token"]) == ("http://127.0.0.1:3/mcp", TOKEN_FILE)


def test_an_empty_environment_variable_sets_nothing(config_toml):
    config_toml(url="http://127.0.0.1:3/mcp")
    settings = dispatch_plugin.read_settings({"DISPATCH_URL": "", "CLAUDE_PLUGIN_OPTION_URL": "http://127.0.0.1:2/mcp"})
    assert settings["url"] == "http://127.0.0.1:2/mcp"


def test_a_token_command_in_the_environment_beats_a_token_in_the_options_or_the_file(config_toml):
    config_toml(token=TOKEN_FILE)
    settings = dispatch_plugin.read_settings({"DISPATCH_TOKEN_COMMAND": f"echo {TOKEN_ENV}",
                                              "CLAUDE_PLUGIN_OPTION_TOKEN": TOKEN_OPTION})
    assert "token" not in settings
    assert dispatch_plugin.resolve_token(settings) == (TOKEN_ENV, f"DISPATCH_TOKEN_COMMAND (echo {TOKEN_ENV})")


def test_within_one_place_the_token_beats_the_token_command(config_toml):
    config_toml(token=TOKEN_FILE, token_command="exit 1")
    assert dispatch_plugin.resolve_token(dispatch_plugin.read_settings({}))[0] == TOKEN_FILE


def test_the_plugin_options_alone_configure_the_plugin(config_toml):
    config = dispatch_plugin.load_config("0123abcd-0000", env={"CLAUDE_PLUGIN_OPTION_URL": "http://127.0.0.1:2/mcp",
                                                               "CLAUDE_PLUGIN_OPTION_TOKEN": TOKEN_OPTION})
    assert (config.url, config.base, config.name) == ("http://127.0.0.1:2/mcp", "option", "option-0123abcd")
    assert config.token_source == "the plugin's token option"


def test_with_nothing_configured_the_error_names_the_plugin_option_too(config_toml):
    with pytest.raises(dispatch_plugin.ConfigError, match="no broker URL: set DISPATCH_URL .* or the plugin's url option"):
        dispatch_plugin.load_config(env={"CLAUDE_PLUGIN_OPTION_URL": "", "CLAUDE_PLUGIN_OPTION_TOKEN": ""})


def test_the_package_declares_each_option_and_hands_each_to_the_server_by_its_hook_name():
    """plugin.json's userConfig, .mcp.json's env and PLUGIN_OPTIONS name the same options, none
    required (Claude Code drops a server whose required option is unset, without a word), the
    token sensitive; the server gets them under the names hooks get (never DISPATCH_*: an unset
    option is '' there, which would hide the user's own DISPATCH_URL)."""
    declared = json.loads((ROOT / ".claude-plugin" / "plugin.json").read_text())["userConfig"]
    env = json.loads((ROOT / ".mcp.json").read_text())["mcpServers"]["dispatch"]["env"]
    assert set(declared) == set(dispatch_plugin.PLUGIN_OPTIONS)
    assert not any(option.get("required") for option in declared.values())
    assert declared["token"].get("sensitive") is True and not declared["url"].get("sensitive")
    assert env == {f"{dispatch_plugin.OPTION_PREFIX}{key.upper()}": f"${{user_config.{key}}}"
                   for key in dispatch_plugin.PLUGIN_OPTIONS}
    assert not any(name.startswith("DISPATCH_") for name in env)
