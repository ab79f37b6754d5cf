"""Plain vLLM's adapter loads, the peer of `bench lora`'s vLLM rows. Run by the vLLM interpreter:

    <vllm python> -m tangram.bench.lora_vllm_peer JOB.json RESULT.json

job: {"model": HF dir, "dtype", "max_lora_rank", "max_model_len", "adapters": [PEFT dirs], "repeats",
"prompt": [ids], "max_tokens"}; result: {"loads": per adapter, the seconds of `LLMEngine.add_lora` (vLLM reads
`adapter_model.safetensors` and builds its LoRA model) with the file dropped from the page cache ("cold") and in
it ("warm"), each adapter removed again after each load; "greedy": the first adapter's greedy continuation of
the prompt (the check that both systems serve the same adapter)}.
Imports only vLLM and the standard library.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _drop(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    """Time vLLM's own adapter loads for the job's adapters."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.llm_engine import LLMEngine

    with open(sys.argv[1]) as f:
        job = json.load(f)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=job["model"], dtype=job["dtype"], enforce_eager=True, kv_cache_memory_bytes=256 << 20,
        max_model_len=job["max_model_len"], enable_lora=True, max_loras=1, max_lora_rank=job["max_lora_rank"]))
    ids = iter(range(1, 1 << 30))
    rows = []
    for path in job["adapters"]:
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        for _ in range(job["repeats"]):
            for state in ("cold", "warm"):
                if state == "cold":
                    _drop(os.path.join(path, "adapter_model.safetensors"))
                gc.collect()
                lora_id = next(ids)
                t0 = time.perf_counter()
                engine.add_lora(LoRARequest(f"a{lora_id}", lora_id, path))
                times[state].append(time.perf_counter() - t0)
                engine.remove_lora(lora_id)
        rows.append({"adapter": path, **times})
    first = job["adapters"][0]
    engine.add_request("greedy", {"prompt_token_ids": job["prompt"]},
                       SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True),
                       lora_request=LoRARequest("greedy", next(ids), first))
    greedy: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                greedy = list(out.outputs[0].token_ids)
    with open(sys.argv[2], "w") as f:
        json.dump({"loads": rows, "greedy": greedy}, f)


if __name__ == "__main__":
    main()
