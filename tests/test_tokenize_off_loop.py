"""Tokenizing a request (a chat template, a prompt of megabytes) runs off the event loop, and a request
cancelled while it tokenizes is still aborted once it reaches its engine."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from serving import chat_model_dir, serving
from tangram.control import Controller, Deployment
from tangram.engine import SamplingParams
from tangram.worker import Worker


class Gate:
    """Wraps a replica's `submit` (tokenize, validate, queue): it signals `entered` and waits for `release`."""

    def __init__(self, replica) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.real_submit, self.real_abort = replica.submit, replica.abort
        self.submitted: list[str] = []
        self.aborted: list[str] = []
        replica.submit, replica.abort = self.submit, self.abort

    def submit(self, *args, **kwargs) -> str:
        self.entered.set()
        self.release.wait(15)
        rid = self.real_submit(*args, **kwargs)
        self.submitted.append(rid)
        return rid

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)
        self.real_abort(rid)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("offloop") / "tiny")


def test_health_answers_while_a_huge_prompt_is_tokenized(model_dir):
    with serving([Deployment(name="tiny", checkpoint=str(model_dir), keep_alive_s=600)]) as srv:
        httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 1}, timeout=60)
        gate = Gate(next(iter(srv.workers[0].replicas.values())))
        done: dict[str, float] = {}
        big: list[httpx.Response] = []

        def send_big() -> None:
            prompt = "w5 " * 1_000_000  # 3 MB, a million tokens: far past the context
            big.append(httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": prompt}, timeout=120))
            done["big"] = time.perf_counter()

        sender = threading.Thread(target=send_big)
        sender.start()
        try:
            assert gate.entered.wait(60), "the big request never reached its engine"
            # on the loop, the tokenizing request would hold this until its gate opens (and time it out)
            assert httpx.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}
            done["health"] = time.perf_counter()
        finally:
            gate.release.set()
            sender.join(120)
        assert done["health"] < done["big"]
        assert big[0].status_code == 400 and big[0].json()["error"]["code"] == "context_length_exceeded"


def test_a_request_cancelled_while_tokenizing_is_aborted_once_queued(model_dir):
    async def main() -> None:
        worker = Worker(0, "cpu", 64 << 20)
        ctl = Controller([worker])
        await ctl.deploy(Deployment(name="t", checkpoint=str(model_dir), keep_alive_s=600))
        async for _ in ctl.generate("t", "w5", SamplingParams(max_tokens=1)):
            pass
        replica = next(iter(worker.replicas.values()))
        gate = Gate(replica)

        async def first_output():
            agen = ctl.generate("t", "w5 w6", SamplingParams(max_tokens=60, ignore_eos=True))
            return await agen.__anext__()

        task = asyncio.create_task(first_output())
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, gate.entered.wait, 30)
        task.cancel()  # the client went away while its prompt was being tokenized
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ctl.describe("t")["inflight"] == 1  # still counted: its submit is not through yet
        gate.release.set()
        deadline = time.monotonic() + 30
        while not gate.aborted or ctl.describe("t")["inflight"] or replica.inflight:
            assert time.monotonic() < deadline, (gate.submitted, gate.aborted, ctl.describe("t")["inflight"])
            await asyncio.sleep(0.01)
        assert gate.aborted == gate.submitted and len(gate.submitted) == 1
        await ctl.shutdown()

    asyncio.run(main())
