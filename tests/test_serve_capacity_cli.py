"""`tangram serve --pool-capacity` and TANGRAM_POOL_CAPACITY: parsed with a clear error, printed at start."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from serving import chat_model_dir
from tangram.cli import app
from tangram.control import Deployment, ServeConfig
from tangram.pool.capacity import ENV_CAPACITY

runner = CliRunner()


def test_a_bad_pool_capacity_is_a_clear_error_before_serving(monkeypatch):
    monkeypatch.delenv(ENV_CAPACITY, raising=False)
    result = runner.invoke(app, ["serve", "--port", "0", "--pool-capacity", "lots"])
    assert result.exit_code == 2 and "serving" not in result.output
    assert result.output.startswith("error: pool capacity 'lots': give bytes with a unit"), result.output
    monkeypatch.setenv(ENV_CAPACITY, "6 parsecs")
    result = runner.invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 2 and f"error: {ENV_CAPACITY}: pool capacity '6 parsecs': unknown unit" in result.output


def test_serve_prints_each_pool_capacity_and_how_it_was_chosen(tmp_path, monkeypatch):
    model_dir = chat_model_dir(tmp_path / "tiny")
    cfg = ServeConfig(port=0, admin_token="test-token", deployments=[Deployment(name="tiny", checkpoint=str(model_dir))])
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    monkeypatch.setenv(ENV_CAPACITY, "48MiB")  # the environment's, below the command line's
    result = runner.invoke(app, ["serve", "--config", str(path), "--pool-capacity", "64MiB", "--ask", "w5", "--once"])
    assert result.exit_code == 0, result.output
    assert "pool cpu#0: 64.00 MiB (given)" in result.output and "time to first token" in result.output
    result = runner.invoke(app, ["serve", "--config", str(path), "--ask", "w5", "--once"])
    assert result.exit_code == 0 and "pool cpu#0: 48.00 MiB (given)" in result.output, result.output
    monkeypatch.delenv(ENV_CAPACITY)
    result = runner.invoke(app, ["serve", "--config", str(path), "--ask", "w5", "--once"])
    assert result.exit_code == 0 and "(default: min(25% of " in result.output, result.output
