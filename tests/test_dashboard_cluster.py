"""The pool map in cluster mode: one device entry per worker actor, named and grouped by node (marker `ray`)."""

from __future__ import annotations

import httpx
import openai
import pytest

from test_cluster import NODE, llama_dir  # noqa: F401 - the cluster tests' node resources and tiny models
from tangram.control import Deployment, ServeConfig
from tangram.pool import PoolConfig
from tangram.serve import Server

pytestmark = pytest.mark.ray


def test_the_pool_map_has_every_actor_with_its_node_and_evictions(tmp_path):
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **NODE))
    cluster.add_node(**NODE)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        cfg = ServeConfig(port=0, pool_capacity=64 << 20, admin_token="test-token", cpu_devices=1,
                          pool=PoolConfig(policy="lru"),  # reaches the actors' pools, not only local ones
                          deployments=[Deployment(name="a", checkpoint=str(llama_dir(tmp_path / "a", 32)))])
        with Server(cfg, ray_address=cluster.address).running() as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
            assert c.completions.create(model="a", prompt="w5", max_tokens=2).usage.completion_tokens == 2
            m = httpx.get(srv.url + "/admin/pool-map", headers={"Authorization": "Bearer test-token"},
                          timeout=60).json()
            assert [(d["worker"], d["node"]) for d in m["devices"]] == [("cpu#0@node0", 0), ("cpu#1@node1", 1)]
            assert {d["arena"]["policy"] for d in m["devices"]} == {"lru"}
            held = [d for d in m["devices"] if d["arena"]["tensors"]]
            assert len(held) == 1 and held[0]["instances"][0]["deployment"] == "a"
            assert [s["models"] for s in held[0]["arena"]["segments"] if s["state"] == "active"] == [["a"]]
            assert [e["kind"] for e in m["events"]] == ["deploy", "start"]
    finally:
        ray.shutdown()
        cluster.shutdown()
