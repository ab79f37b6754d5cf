"""Plain vLLM's greedy continuations, as the reference of the vLLM-backend tests. Run by the vLLM interpreter:

    <vllm python> tests/vllm_reference.py JOBS.json RESULTS.json

jobs: [{"model": HF dir, "dtype": ..., "prompts": [[ids], ...], "max_tokens": n}, ...]; results: one list of
token-id lists per job. vLLM's own default loader reads each directory's safetensors (the baseline).
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    results = []
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        engine = LLMEngine.from_engine_args(EngineArgs(model=job["model"], dtype=job["dtype"], enforce_eager=True,
                                                       kv_cache_memory_bytes=256 << 20,
                                                       max_model_len=job.get("max_model_len")))
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
        for i, ids in enumerate(job["prompts"]):
            engine.add_request(str(i), {"prompt_token_ids": ids}, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = list(out.outputs[0].token_ids)
        results.append([done[i] for i in range(len(job["prompts"]))])
        del engine
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
