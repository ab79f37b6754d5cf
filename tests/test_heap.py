"""Start-up objects are kept out of the collector's full passes while a server runs, and handed back after."""

from __future__ import annotations

import gc
import weakref

from serving import chat_model_dir, serving
from tangram.control import Deployment
from tangram.heap import freeze_startup_heap, thaw_heap


class Cycle:
    """An object in a reference cycle: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_frozen_objects_skip_collections_until_thawed():
    alive = Cycle()
    ref = weakref.ref(alive)
    freeze_startup_heap()
    try:
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # out of every generation the collector walks
        del alive
        gc.collect()
        assert ref() is not None  # a frozen cycle is not freed ...
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None  # ... until it is thawed


def test_a_server_freezes_its_start_up_heap_while_it_serves(tmp_path):
    model = chat_model_dir(tmp_path / "m")
    with serving([Deployment(name="m", checkpoint=str(model), min_instances=1)]):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
