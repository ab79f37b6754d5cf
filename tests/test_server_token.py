"""The admin-token file belongs to the server that wrote it: per port, written after the bind, removed at exit."""

from __future__ import annotations

import json
import stat

import pytest
from typer.testing import CliRunner

from serving import chat_model_dir
from tangram.cli import app
from tangram.control import Deployment, ServeConfig
from tangram.serve import Server
from tangram.serve.client import AdminClient, AdminError, local_token
from tangram.serve.server import resolve_token, token_file

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("token") / "tiny")


@pytest.fixture(autouse=True)
def no_token_env(monkeypatch):
    monkeypatch.delenv("TANGRAM_ADMIN_TOKEN", raising=False)


def config(model_dir, port: int = 0, **kw) -> ServeConfig:
    """A loopback config without an admin token (so each server generates its own) serving the tiny model."""
    return ServeConfig(port=port, pool_capacity=64 << 20,
                       deployments=[Deployment(name="tiny", checkpoint=str(model_dir), keep_alive_s=600)], **kw)


def test_a_second_server_on_the_port_leaves_the_first_ones_token(model_dir, tmp_path):
    with Server(config(model_dir)).running() as first:
        path = token_file(first.port)
        assert first.token_path == path and path.read_text() == first.token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(OSError, match="cannot listen"):
            Server(config(model_dir, first.port)).run()  # what a second `tangram serve` does
        cfg_file = tmp_path / "serve.json"
        cfg_file.write_text(json.dumps(config(model_dir, first.port).model_dump(mode="json")))
        second = runner.invoke(app, ["serve", "--config", str(cfg_file)])
        assert second.exit_code == 2, second.output
        assert "cannot listen" in second.output and "serving" not in second.output
        assert path.read_text() == first.token
        assert [d["name"] for d in AdminClient(first.url).list()] == ["tiny"]  # the token file authenticates
        ls = runner.invoke(app, ["ls", "--url", first.url])
        assert ls.exit_code == 0 and "tiny" in ls.output, ls.output
    assert not path.exists()  # removed at a clean stop


def test_two_servers_on_two_ports_keep_their_own_tokens(model_dir):
    with Server(config(model_dir)).running() as a, Server(config(model_dir)).running() as b:
        assert a.token != b.token and a.token_path != b.token_path
        assert local_token(a.url) == a.token and local_token(b.url) == b.token
        assert AdminClient(a.url).status() and AdminClient(b.url).status()


def test_the_file_is_left_alone_when_it_no_longer_holds_this_servers_token(model_dir):
    with Server(config(model_dir)).running() as srv:
        srv.token_path.write_text("written-by-someone-else")
    assert srv.token_path.read_text() == "written-by-someone-else"


def test_local_token_reads_the_port_of_the_url_and_only_for_loopback():
    token_file(18431).write_text("abc\n")
    assert local_token("http://127.0.0.1:18431") == "abc"
    assert local_token("http://localhost:18431/") == "abc"
    assert local_token("http://127.0.0.1:18432") is None
    assert local_token("http://10.1.2.3:18431") is None  # a local token is never sent to another machine
    with pytest.raises(AdminError, match="401|cannot reach"):
        AdminClient("http://127.0.0.1:18432").list()


def test_a_non_loopback_bind_needs_an_admin_token_of_16_characters(monkeypatch):
    with pytest.raises(ValueError, match="without an admin token"):
        resolve_token(ServeConfig(host="0.0.0.0"))
    with pytest.raises(ValueError, match="at least 16"):
        resolve_token(ServeConfig(host="0.0.0.0", admin_token="short"))
    monkeypatch.setenv("TANGRAM_ADMIN_TOKEN", "fifteen-chars-x")
    with pytest.raises(ValueError, match="15 characters"):
        resolve_token(ServeConfig(host="10.0.0.1"))
    assert resolve_token(ServeConfig(host="0.0.0.0", admin_token="sixteen-chars-xx")) == ("sixteen-chars-xx", False)
    assert resolve_token(ServeConfig(admin_token="short")) == ("short", False)  # loopback: any token
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2 and "at least 16" in result.output and "serving" not in result.output
