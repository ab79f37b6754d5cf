"""The `tangram` command line: convert, inspect, load; bad input exits non-zero with a message naming the file."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from conftest import save_hf_dir, tiny_model
from tangram.cli import app
from tangram.store import load

runner = CliRunner()


def test_convert_inspect_load(tmp_path):
    model = tiny_model("llama")
    src = save_hf_dir(model, tmp_path / "hf")
    dst = tmp_path / "tgm"
    result = runner.invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output
    loaded = load(dst)
    for name, p in model.state_dict().items():
        if name in loaded:
            assert torch.equal(loaded[name], p)
    result = runner.invoke(app, ["inspect", str(dst)])
    assert result.exit_code == 0 and "llama" in result.output and "xxh3_128" in result.output
    result = runner.invoke(app, ["load", str(dst), "--verify", "--device", "cpu", "--method", "pread"])
    assert result.exit_code == 0, result.output
    assert "pread" in result.output


def test_convert_refuses_existing_destination(tmp_path):
    src = save_hf_dir(tiny_model("gpt2"), tmp_path / "hf")
    dst = tmp_path / "tgm"
    assert runner.invoke(app, ["convert", str(src), str(dst)]).exit_code == 0
    result = runner.invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code != 0
    assert "already exists" in result.output and str(dst) in result.output
    assert runner.invoke(app, ["convert", str(src), str(dst), "--force"]).exit_code == 0


def test_bad_inputs_exit_nonzero_naming_the_file(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "missing" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "tokenizer.json").write_text("{}")
    result = runner.invoke(app, ["convert", str(empty), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no safetensors or PyTorch .bin weights" in result.output
    result = runner.invoke(app, ["load", str(empty)])  # a HF directory is converted first: same clear error
    assert result.exit_code == 2 and "no safetensors or PyTorch .bin weights" in result.output
    (tmp_path / "neither").mkdir()
    result = runner.invoke(app, ["load", str(tmp_path / "neither")])
    assert result.exit_code == 2 and "neither a Tangram checkpoint" in result.output


def test_load_reports_truncated_checkpoint(tmp_path):
    src = save_hf_dir(tiny_model("qwen2"), tmp_path / "hf")
    dst = tmp_path / "tgm"
    assert runner.invoke(app, ["convert", str(src), str(dst)]).exit_code == 0
    data = dst / json.loads((dst / "tangram.json").read_text())["files"][0]["name"]
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    result = runner.invoke(app, ["load", str(dst)])
    assert result.exit_code == 2
    assert data.name in result.output and "truncated" in result.output


def test_run_streams_text_and_prints_the_stage_breakdown(tmp_path):
    from conftest import engine_model

    src = save_hf_dir(engine_model("llama"), tmp_path / "hf")
    result = runner.invoke(app, ["run", str(src), "w5 w17 w33", "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "stage breakdown (cold start" in result.output and "time to first token" in result.output
    assert result.output.count(" w") >= 4  # the streamed words
    again = runner.invoke(app, ["run", str(src), "w5 w17 w33", "--max-tokens", "5", "--kv-mode", "reserve"])
    assert again.exit_code == 0, again.output  # the converted copy is reused


def test_run_rejects_bad_input(tmp_path):
    src = save_hf_dir(tiny_model("llama"), tmp_path / "hf")
    bad = runner.invoke(app, ["run", str(src), "w5", "--temperature", "-1"])
    assert bad.exit_code == 2 and "temperature" in bad.output
    missing = runner.invoke(app, ["run", str(tmp_path / "nope"), "hi"])
    assert missing.exit_code == 2 and "no such model" in missing.output
    chat = runner.invoke(app, ["run", str(src), "w5", "--chat"])
    assert chat.exit_code == 2 and "chat template" in chat.output


def test_errors_print_styled_text_not_literal_markup(tmp_path):
    served = runner.invoke(app, ["rm", "x", "--url", "http://127.0.0.1:9", "--token", "t"])  # cli_serve's path
    assert served.exit_code == 2
    assert served.output.startswith("error: cannot reach the server") and "[" not in served.output.split(":")[0]
    assert "[bold red]" not in served.output and "[/]" not in served.output
    odd = tmp_path / "[bold]odd[/]"  # a path that looks like markup prints as it is
    local = runner.invoke(app, ["convert", str(odd), str(tmp_path / "out")])  # cli.py's path
    assert local.exit_code == 2 and str(odd) in local.output and "[bold red]" not in local.output


def test_one_error_helper_for_every_command():
    from tangram import cli, cli_common, cli_serve

    assert cli._fail is cli_common.fail and cli_serve._fail is cli_common.fail


def test_serve_rejects_a_bad_port_before_printing_anything():
    for port in ("70000", "-1"):
        result = runner.invoke(app, ["serve", "--port", port])
        assert result.exit_code == 2, result.output
        assert "serving" not in result.output and "Traceback" not in result.output
        assert "Invalid value for '--port'" in result.output
        assert ("65535" if port == "70000" else "greater than or equal to 0") in result.output


def test_serve_validates_a_config_file_port_and_a_taken_port(tmp_path):
    import socket

    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"port": 70000}))
    result = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2 and "serving" not in result.output
    assert result.output.startswith("error: port: Input should be less than or equal to 65535")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = runner.invoke(app, ["serve", "--port", str(taken.getsockname()[1])])
    assert result.exit_code == 2 and "serving" not in result.output
    assert "cannot listen on 127.0.0.1" in result.output and "Traceback" not in result.output


def test_every_serving_option_and_argument_has_help():
    import typer.main

    commands = typer.main.get_command(app).commands
    for name in ("serve", "deploy", "ls", "rm", "status"):
        for param in commands[name].params:
            assert param.help, f"{name} {param.name} has no help text"
    assert "Deployment to remove" in runner.invoke(app, ["rm", "--help"]).output


def test_deploy_sends_the_engine_settings_it_was_given(monkeypatch, tmp_path):
    from tangram.serve.client import AdminClient

    sent = []
    monkeypatch.setattr(AdminClient, "deploy", lambda self, spec: sent.append(spec) or
                        {"name": spec["name"], "bytes": 0, "resolved_checkpoint": "x"})
    result = runner.invoke(app, ["deploy", "q2", "--checkpoint", "demo", "--backend", "vllm", "--max-loras", "4",
                                 "--max-lora-rank", "32", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert sent[0]["backend"] == "vllm"
    assert sent[0]["engine"] == {"dtype": "float32", "max_loras": 4, "max_lora_rank": 32}
