"""The wait-or-migrate rules (scheduler/migration.py), pure: no engine, no server."""

from __future__ import annotations

import math

from tangram.scheduler.migration import Busy, Rates, consolidate, measured, migrate_s, room_plan, start_s, wait_s

RATES = Rates(decode_s=0.02, prefill_s_per_token=0.001, handover_s=0.05)


def test_a_long_running_request_is_migrated_a_nearly_done_one_is_waited_for():
    long = Busy(remaining_tokens=500, context_tokens=300, can_migrate=True, dest_ready_s=0.0)
    short = Busy(remaining_tokens=5, context_tokens=300, can_migrate=True, dest_ready_s=0.0)
    assert wait_s(long, RATES) == 10.0 and math.isclose(migrate_s(long, RATES), 0.35)
    assert room_plan([long, short], RATES) == ["migrate", "wait"]
    assert math.isclose(start_s(1.0, [long, short], RATES), 1.0 + 0.35)  # the slower of the two, then the load
    assert start_s(1.0, [long, short], RATES, ["wait", "wait"]) == 11.0  # today's drain


def test_no_destination_or_no_migrating_backend_means_waiting():
    nowhere = Busy(remaining_tokens=500, context_tokens=10, can_migrate=True, dest_ready_s=math.inf)
    vllm = Busy(remaining_tokens=500, context_tokens=10, can_migrate=False, dest_ready_s=0.0)
    assert migrate_s(nowhere, RATES) == migrate_s(vllm, RATES) == math.inf
    assert room_plan([nowhere, vllm], RATES) == ["wait", "wait"]


def test_a_destination_that_must_start_first_counts_its_start():
    cold = Busy(remaining_tokens=100, context_tokens=100, can_migrate=True, dest_ready_s=3.0)
    assert wait_s(cold, RATES) == 2.0 and migrate_s(cold, RATES) > 3.0
    assert room_plan([cold], RATES) == ["wait"]
    assert room_plan([cold], Rates(decode_s=0.1)) == ["migrate"]  # a slower source: the start pays off
    assert start_s(0.5, [], RATES) == 0.5  # nothing in the way


def test_scale_in_empties_the_least_loaded_instance_when_the_others_can_take_its_requests():
    assert consolidate([3, 1, 2], target=4, movable=[True] * 3) == 1  # 1 fits in the 1 + 2 seats left
    assert consolidate([4, 3, 4], target=4, movable=[True] * 3) is None  # no spare seat
    assert consolidate([2, 1], target=4, movable=[True, False]) == 0  # the other cannot move
    assert consolidate([0, 2], target=4, movable=[True, True]) is None  # the idle one scales in by keep-alive
    assert consolidate([5], target=8, movable=[True]) is None  # one instance: nothing to consolidate into


def test_measured_speeds_replace_the_priors_and_can_change_the_choice():
    assert measured(RATES, None, None) == RATES  # nothing measured yet
    m = measured(RATES, 0.2, 0.004)
    assert m == Rates(decode_s=0.2, prefill_s_per_token=0.004, handover_s=0.05)
    b = Busy(remaining_tokens=20, context_tokens=400, can_migrate=True, dest_ready_s=0.0)
    assert room_plan([b], RATES) == ["wait"]  # 0.4 s to wait against 0.45 s to move, with the priors
    assert room_plan([b], m) == ["migrate"]  # a slow source: 4 s to wait, 1.65 s to move
