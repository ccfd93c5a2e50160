"""The broker and the plugin agree on the wire.

Each value both programs must share is defined once in each module (the plugin imports nothing
of the broker's: it is standard library only); this test imports both and fails when they drift.
"""

import inspect
import json
import sys

import mcp_types.version
import pytest

from harness import PLUGIN

sys.path.insert(0, str(PLUGIN.parent))
import dispatch_broker as broker  # noqa: E402
import dispatch_plugin as plugin  # noqa: E402


def test_tokens_and_names_have_one_shape_on_both_sides():
    assert plugin.BASE_PATTERN == broker.BASE_PATTERN
    assert plugin.TOKEN_BYTES == broker.TOKEN_BYTES
    assert plugin.TOKEN_RE.pattern == broker.TOKEN_RE.pattern
    assert plugin.NAME_RE.pattern == broker.NAME_RE.pattern


def test_a_token_the_broker_mints_is_one_the_plugin_takes_with_its_base(tmp_path):
    _, token = broker.mint_token(tmp_path / "tokens", "backend")
    assert plugin.TOKEN_RE.fullmatch(token)[1] == "backend"
    assert not plugin.TOKEN_RE.fullmatch(token + "\n") and not plugin.TOKEN_RE.fullmatch(token[:-1])


def test_every_pattern_is_used_whole_on_both_sides():
    """`$` with .match lets a trailing newline through; fullmatch does not."""
    for module in (broker, plugin):
        source = inspect.getsource(module)
        for name in ("TOKEN_RE", "NAME_RE", "BASE_RE", "MESSAGE_ID_RE", "CLIENT_MSG_ID_RE"):
            assert f"{name}.match(" not in source and f"{name}.search(" not in source, (module.__name__, name)


def test_the_link_header_the_protocol_era_and_the_mail_method_match():
    assert plugin.LINK_HEADER.lower() == broker.LINK_HEADER  # HTTP header names are case-insensitive
    assert plugin.BROKER_PROTOCOL == broker.LINK_PROTOCOL
    assert broker.LINK_PROTOCOL in mcp_types.version.MODERN_PROTOCOL_VERSIONS  # the SDK serves it
    assert plugin.MAIL_METHOD == broker.MAIL_METHOD


def test_the_plugin_never_answers_claude_code_in_the_era_that_loses_channels():
    assert plugin.BROKER_PROTOCOL not in plugin.CHANNEL_PROTOCOLS


def test_pushed_mail_carries_every_field_the_plugin_reads():
    mail = broker.Mail("m_" + "0" * 2 * broker.MESSAGE_ID_BYTES, "a-1~a-2~n~m", "a-1", "a-2", "hi", 0.0, 1).params()
    assert broker.MESSAGE_ID_RE.fullmatch(mail["id"])
    proofs = plugin.Proofs("dsp_a_" + "0" * 2 * plugin.TOKEN_BYTES, ())
    meta = plugin.channel_meta(mail, proofs)
    assert meta["message_id"] == mail["id"] and all(isinstance(v, str) for v in meta.values())
    line = json.loads(plugin.mail_line(mail, proofs))
    assert set(line) == plugin.MAIL_FIELDS and line["message_id"] == mail["id"]
    assert mail["attempt"] == 1  # the prompt hook waits for the channel's proof of pushed mail


def test_the_plugins_client_msg_ids_are_ones_the_broker_takes():
    for _ in range(100):
        assert broker.CLIENT_MSG_ID_RE.fullmatch(plugin.new_client_msg_id())


def test_the_plugin_asks_for_no_more_than_the_broker_gives():
    assert plugin.LISTEN_SECONDS <= broker.MAX_LISTEN_SECONDS
    assert plugin.INBOX_LIMIT <= broker.INBOX_MAX_LIMIT


def test_the_heartbeat_outlasts_three_keepalives():
    """A listen stream silent for the heartbeat is given up: one keepalive may be lost, the next late."""
    assert 3 * broker.KEEPALIVE_SECONDS <= plugin.HEARTBEAT_SECONDS


def test_a_send_is_retried_for_less_time_than_the_broker_remembers_its_id():
    assert plugin.SEND_RETRY_SECONDS < broker.DEFAULT_TTL


def test_the_proof_of_a_channel_event_is_awaited_for_less_than_the_ack_timeout():
    """Else the broker pushes again while the plugin still waits, and each push costs a tool call."""
    assert plugin.PROOF_SECONDS < broker.DEFAULT_ACK_TIMEOUT


def test_each_listen_is_renewed_long_before_the_broker_forgets_an_idle_link():
    assert plugin.LISTEN_SECONDS < broker.DEFAULT_SESSION_IDLE_TIMEOUT


def test_the_plugins_link_id_is_one_the_broker_keeps():
    config = plugin.Config("http://127.0.0.1:8765/mcp", "dsp_backend_" + "0" * 48, "backend", "backend-1", "test")
    for _ in range(100):
        assert broker.LINK_ID_RE.fullmatch(plugin.BrokerClient(config).link_id)


@pytest.mark.parametrize("xdg_config_home", [None, "/somewhere/config"])
def test_install_writes_config_toml_where_the_plugin_reads_it(monkeypatch, tmp_path, xdg_config_home):
    env = {"HOME": str(tmp_path)} | ({"XDG_CONFIG_HOME": xdg_config_home} if xdg_config_home else {})
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg_config_home:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg_config_home)
    else:
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert str(broker.plugin_config_file(env)) == plugin.config_file()


def test_the_doctor_looks_for_the_broker_where_it_listens_by_default_and_under_the_name_build_gives_it():
    import build

    assert plugin.LOCAL_BROKER_URL == f"http://{broker.DEFAULT_HOST}:{broker.DEFAULT_PORT}/mcp"
    built = {(p.system, machine): p.name for p in build.PLATFORMS for machine in p.machines}
    assert plugin.BROKER_PLATFORMS == built


@pytest.mark.parametrize("xdg_data_home", [None, "/somewhere/data"])
def test_the_doctor_knows_where_install_keeps_the_tokens(tmp_path, xdg_data_home):
    env = {"HOME": str(tmp_path)} | ({"XDG_DATA_HOME": xdg_data_home} if xdg_data_home else {})
    assert plugin.installed_tokens(env) == str(broker.Layout.for_user(env=env).tokens)


def test_the_postmasters_name_and_the_longest_send_wait_match():
    assert plugin.POSTMASTER == broker.POSTMASTER
    assert broker.BASE_RE.fullmatch(broker.POSTMASTER)  # a name's shape: the plugin shows it like any sender
    assert plugin.MAX_SEND_WAIT == broker.MAX_SEND_WAIT
    assert plugin.STATUS_LAST <= broker.STATUS_MAX_LIMIT
