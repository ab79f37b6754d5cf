"""A worker parses a checkpoint's index once per version of the index file: a restart (a pool hit) parses
nothing, a rewritten index is read again."""

from __future__ import annotations

import os
import time

from conftest import engine_checkpoint, engine_model
from tangram.engine import EngineConfig
from tangram.store.format import INDEX_FILE
from tangram.worker.worker import Worker


def test_a_restart_reuses_the_parsed_checkpoint_and_a_new_index_is_read_again(tmp_path):
    ckpt = engine_checkpoint(engine_model("llama"), tmp_path)
    worker = Worker(0, "cpu", 64 << 20)
    cfg = EngineConfig(block_tokens=4)
    first = worker._checkpoint(ckpt)
    assert worker._checkpoint(ckpt) is first
    replica = worker.start("m", ckpt, cfg, time.perf_counter())
    worker.stop(replica)
    index = ckpt / INDEX_FILE
    st = index.stat()
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the index was rewritten
    again = worker._checkpoint(ckpt)
    assert again is not first and again.index == first.index
