"""Scheduler without a model: token budget, chunked prefill, FCFS admission, preemption."""

from __future__ import annotations

from sawkv.cache.block_manager import BlockManager
from sawkv.config import SchedulerConfig
from sawkv.engine.sampling_params import SamplingParams
from sawkv.engine.scheduler import Scheduler
from sawkv.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, **kw):
    return Scheduler(SchedulerConfig(**kw), BlockManager(num_blocks, block_size, True))


def add(sched, rid, n, start=0):
    s = Sequence(rid, list(range(start, start + n)), SamplingParams())
    sched.add(s)
    return s


def advance(batch, new_token=1):
    """Pretend the model ran: mark tokens computed and append a token where one is sampled."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(new_token)


def test_chunked_prefill_respects_budget():
    sched = make(max_num_batched_tokens=10)
    a, b = add(sched, "a", 25), add(sched, "b", 3, 100)
    sizes = []
    for _ in range(4):
        batch = sched.schedule()
        sizes.append([(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)])
        assert batch.num_tokens <= 10
        advance(batch)
    # a's prompt goes in chunks of the budget; b is admitted only after a (FCFS) with what remains
    assert sizes[0] == [("a", 10)]
    assert sizes[1] == [("a", 10)]
    assert sizes[2] == [("a", 5), ("b", 3)]
    assert sizes[3] == [("a", 1), ("b", 1)]  # both decoding
    assert a.num_output_tokens == 2 and b.num_output_tokens == 2


def test_running_sequences_come_first_in_fcfs_order():
    # the scheduler does not order by query length: the model runner does that for the
    # attention backend (tests/engine/test_step_inputs.py)
    sched = make(max_num_batched_tokens=40)
    add(sched, "a", 3)
    advance(sched.schedule())  # a decodes from now on
    add(sched, "b", 60, 100)
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)] == [
        ("a", 1),
        ("b", 39),
    ]
    advance(batch)
    add(sched, "c", 2, 200)  # waiting c is admitted after the running a and b
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)] == [
        ("a", 1),
        ("b", 21),
        ("c", 2),
    ]


def test_max_num_seqs():
    sched = make(max_num_seqs=2)
    for i in range(4):
        add(sched, f"r{i}", 3, 10 * i)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["r0", "r1"]
    assert len(sched.waiting) == 2


def test_preemption_requeues_youngest_at_front():
    # 4 pages of 4 tokens; two 8-token prompts take 2 pages each, then each needs a third
    sched = make(num_blocks=4, block_size=4)
    a, b = add(sched, "a", 8), add(sched, "b", 8, 50)
    advance(sched.schedule())  # both prefilled (+1 sampled token each), 4 pages used
    batch = sched.schedule()  # a needs a 3rd page: b (youngest) is preempted
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and b.block_table == []
    assert sched.num_preemptions == 1
    assert b.num_tokens == 9  # its generated token is kept and recomputed later
    advance(batch)
    sched.finish(a, "length")
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.num_new_tokens == [9]


def test_fcfs_head_blocks_later_requests():
    sched = make(num_blocks=4, block_size=4)
    add(sched, "a", 12)
    advance(sched.schedule())  # a holds 3 pages (12 tokens + 1 sampled -> needs 4 soon)
    add(sched, "big", 8, 100)  # needs 2 pages: only 1 free
    add(sched, "small", 1, 200)  # would fit, but must not overtake "big"
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["big", "small"]


def test_abort_frees_pages():
    sched = make(num_blocks=8, block_size=4)
    add(sched, "a", 9)
    sched.schedule()
    assert sched.block_manager.num_free_blocks == 5
    assert sched.abort("a").finish_reason == "abort"
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_unfinished()
