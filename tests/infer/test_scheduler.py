"""The scheduler alone, on hand-worked examples: first come first served under the block reservation and
max_batch, release and abort return the reservation, the preemption hook is asked for the shortfall, and
the decode batch groups speculative requests by plan."""

import pytest

from latentmoe import ModelConfig
from latentmoe.infer.paged_cache import PagedLatentCache
from latentmoe.infer.request import Request
from latentmoe.infer.sampling import SamplingParams
from latentmoe.infer.scheduler import Scheduler
from latentmoe.infer.speculative import SpeculativeConfig


def make_cache(num_blocks=10, block_size=4):
    return PagedLatentCache(ModelConfig.from_preset("tiny"), num_layers=1, num_blocks=num_blocks, block_size=block_size)


def make_request(request_id, reserved, plan=None):
    return Request(request_id=request_id, prompt_ids=[0, 1], params=SamplingParams(max_tokens=2), plan=plan,
                   generator=None, arrival=0.0, reserved_blocks=reserved)


def test_admission_is_first_come_first_served_within_blocks_and_batch():
    sched = Scheduler(make_cache(num_blocks=10), max_batch=3)
    reqs = [make_request(i, r) for i, r in enumerate([4, 4, 3, 1, 1])]
    for r in reqs:
        sched.add(r)
    assert sched.admit_next() is reqs[0] and sched.admit_next() is reqs[1]
    assert sched.admit_next() is None  # 4 + 4 + 3 = 11 > 10; the 1-block request behind it waits too
    assert sched.reserved_blocks == 8 and list(sched.waiting) == reqs[2:]
    sched.release(reqs[0])
    assert sched.admit_next() is reqs[2] and sched.admit_next() is reqs[3] and sched.reserved_blocks == 8
    assert sched.admit_next() is None  # blocks would fit (9), but max_batch=3 are running
    assert sched.num_running == 3 and list(sched.waiting) == reqs[4:]


def test_abort_removes_waiting_and_running_requests_and_returns_their_blocks():
    cache = make_cache(num_blocks=10)
    sched = Scheduler(cache, max_batch=4)
    a, b = make_request(0, 3), make_request(1, 3)
    sched.add(a)
    sched.add(b)
    sched.admit_next()
    cache.add_sequence(a.request_id)
    cache.ensure(a.request_id, 9)  # 3 blocks allocated
    assert cache.num_free_blocks == 7
    assert sched.abort(1) is b and sched.num_waiting == 0
    assert sched.abort(0) is a
    assert sched.reserved_blocks == 0 and cache.num_free_blocks == 10 and not cache.block_tables
    assert sched.abort(0) is None and not sched.has_unfinished()


def test_the_preemption_hook_is_asked_for_the_shortfall():
    asked = []

    class Recording(Scheduler):
        def make_room(self, blocks_needed):
            asked.append(blocks_needed)
            return False

    sched = Recording(make_cache(num_blocks=10), max_batch=4)
    sched.add(make_request(0, 7))
    sched.add(make_request(1, 5))
    sched.admit_next()
    assert sched.admit_next() is None and asked == [2]  # 7 + 5 - 10


def test_a_request_larger_than_the_pool_is_refused():
    sched = Scheduler(make_cache(num_blocks=10, block_size=4), max_batch=2)
    assert sched.reserve_for(40) == 10
    with pytest.raises(ValueError, match="needs 11 cache blocks \\(41 positions\\).*holds 10 blocks = 40 tokens"):
        sched.reserve_for(41)
    with pytest.raises(ValueError, match="cache pool"):
        sched.add(make_request(0, 11))


def test_decode_batches_group_speculative_requests_by_plan():
    sched = Scheduler(make_cache(num_blocks=20), max_batch=8)
    one, two = SpeculativeConfig(1).resolve(2), SpeculativeConfig(2).resolve(2)
    reqs = [make_request(0, 1), make_request(1, 1, one), make_request(2, 1, two), make_request(3, 1, one),
            make_request(4, 1)]
    for r in reqs:
        sched.add(r)
        sched.admit_next()
        r.output_ids.append(5)  # prefilled
    batches = sched.decode_batches()
    assert batches.plain == [reqs[0], reqs[4]]
    assert batches.speculative == {one: [reqs[1], reqs[3]], two: [reqs[2]]}
    assert sorted(r.request_id for r in batches.requests) == [0, 1, 2, 3, 4]
