"""Pure control-plane policies with hand-made inputs: autoscaling, dispatch, placement, config files."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tangram.control import Deployment, ServeConfig
from tangram.control.autoscale import drain_victim, idle_victim, least_loaded, pick_instance, should_scale_down
from tangram.serve.server import is_loopback, resolve_token


def test_idle_victim_is_the_instance_idle_longest():
    assert idle_victim([5.0, None, 2.0, 2.0]) == 2  # idle longest; a tie goes to the lower index
    assert idle_victim([None, None]) is None and idle_victim([]) is None


def test_the_replays_make_room_with_the_controllers_rule():
    from tangram.sim import rules

    assert rules.idle_victim is idle_victim  # one rule: the simulator's re-export is the controller's


def test_pick_instance_prefers_least_loaded_under_target():
    assert pick_instance([3, 1, 2], target=4) == 1
    assert pick_instance([4, 4], target=4) is None
    assert pick_instance([], target=4) is None
    assert least_loaded([5, 4, 6]) == 1


def test_scale_down_after_keep_alive_only():
    assert should_scale_down(idle_since=10.0, now=15.0, keep_alive_s=5.0, instances=1, min_instances=0)
    assert not should_scale_down(idle_since=10.0, now=14.9, keep_alive_s=5.0, instances=1, min_instances=0)
    assert not should_scale_down(idle_since=10.0, now=99.0, keep_alive_s=5.0, instances=1, min_instances=1)
    assert not should_scale_down(idle_since=None, now=99.0, keep_alive_s=5.0, instances=2, min_instances=0)


def test_deployment_validation():
    with pytest.raises(ValidationError, match="deployment names"):
        Deployment(name="bad name!", checkpoint="demo")
    with pytest.raises(ValidationError):
        Deployment(name="ok", checkpoint="demo", max_instances=0)
    with pytest.raises(ValidationError):
        Deployment(name="ok", checkpoint="demo", surprise=1)


def test_config_from_json_and_toml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"port": 9000, "deployments": [{"name": "a", "checkpoint": "demo"}]}))
    assert ServeConfig.from_file(tmp_path / "c.json").deployments[0].name == "a"
    (tmp_path / "c.toml").write_text('port = 9001\n[[deployments]]\nname = "b"\ncheckpoint = "demo"\n'
                                     'keep_alive_s = 5\n[deployments.engine]\nkv_mode = "reserve"\n')
    cfg = ServeConfig.from_file(tmp_path / "c.toml")
    assert cfg.port == 9001 and cfg.deployments[0].engine.kv_mode.value == "reserve"


def test_non_loopback_bind_needs_a_token(monkeypatch):
    monkeypatch.delenv("TANGRAM_ADMIN_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0"):
        resolve_token(ServeConfig(host="0.0.0.0"))
    with pytest.raises(ValueError, match="admin token of 6 characters"):
        resolve_token(ServeConfig(host="0.0.0.0", admin_token="s3cret"))
    strong = "s3cret-s3cret-s3cret"
    assert resolve_token(ServeConfig(host="0.0.0.0", admin_token=strong)) == (strong, False)
    token, generated = resolve_token(ServeConfig())
    assert generated and len(token) >= 24


def test_drain_victim_is_the_busy_instance_that_empties_soonest_among_those_that_give_bytes_back():
    assert drain_victim([3, 1, 2], [0.0, 5.0, 1.0], [10, 10, 10]) == 1
    assert drain_victim([2, 2], [9.0, 4.0], [10, 10]) == 1  # equal load and bytes: the longest-running
    assert drain_victim([2, 2], [9.0, 4.0], [50, 10]) == 0  # equal load: the one giving back most
    # a family member whose tensors another instance also holds gives nothing back: draining it is useless
    assert drain_victim([0, 5], [0.0, 1.0], [0, 80]) == 1
    assert drain_victim([1], [0.0], [0]) is None
    assert drain_victim([], [], []) is None
