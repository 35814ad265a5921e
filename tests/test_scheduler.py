"""Continuous batching and preemption, on the bookkeeping alone (no model: tokens are made up)."""

from __future__ import annotations

import random

from smolvlm.engine.block_manager import BlockManager
from smolvlm.engine.params import SamplingParams
from smolvlm.engine.scheduler import Scheduler, SchedulerConfig
from smolvlm.engine.sequence import Sequence, SequenceStatus

BS = 4
EOS = 0


def make(num_blocks, max_tokens=64, max_seqs=8, max_len=512):
    manager = BlockManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens, max_model_len=max_len), manager)


def seq(seq_id, prompt_len, max_new=5):
    tokens = [1000 + seq_id * 100 + i for i in range(prompt_len)]  # distinct per sequence: no prefix hits
    return Sequence(seq_id, tokens, SamplingParams(max_new_tokens=max_new), BS, stop_token_ids=frozenset({EOS}))


def fake_token(s: Sequence) -> int:
    """A deterministic 'model': the next token depends only on the sequence's own tokens."""
    return 1 + (sum(s.token_ids) * 31 + len(s.token_ids)) % 97


def run_to_completion(sched: Scheduler, max_steps=1000):
    """Drive the scheduler like the engine does; check the invariants after each step."""
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return steps
        batch = sched.schedule()
        steps.append(batch)
        assert batch.num_tokens <= sched.config.max_num_batched_tokens
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs), "a sequence scheduled twice in one step"
        assert all(n == 1 for n in batch.num_new_tokens[: batch.num_decodes])
        assert all(n > 1 for n in batch.num_new_tokens[batch.num_decodes :])
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            # every token computed this step has a slot in the sequence's own blocks
            assert len(s.block_table) * BS >= s.num_computed_tokens + n
        held = [b for s in sched.running for b in s.block_table]
        assert len(held) == len(set(held)), "two running sequences share a block without prefix caching"
        sampled = [fake_token(s) if batch.samples(i) else None for i, s in enumerate(batch.seqs)]
        sched.postprocess(batch, sampled)
    raise AssertionError("did not finish")


def test_single_sequence_prefill_then_decode():
    sched = make(num_blocks=16)
    s = seq(0, 6, max_new=3)
    sched.add(s)
    steps = run_to_completion(sched)
    assert [b.num_new_tokens for b in steps] == [[6], [1], [1]]
    assert s.num_generated_tokens == 3 and s.finish_reason == "length"
    assert sched.block_manager.num_free_blocks == 16


def test_new_requests_join_while_others_decode():
    sched = make(num_blocks=32)
    a = seq(0, 5, max_new=6)
    sched.add(a)
    sched.postprocess(b := sched.schedule(), [fake_token(a)])  # a's prefill
    late = seq(1, 7, max_new=2)
    sched.add(late)
    batch = sched.schedule()
    assert batch.seqs == [a, late] and batch.num_new_tokens == [1, 7] and batch.num_decodes == 1
    del b


def test_long_prompt_is_chunked_within_the_budget():
    sched = make(num_blocks=32, max_tokens=8)
    s = seq(0, 20, max_new=2)
    sched.add(s)
    steps = run_to_completion(sched)
    assert [b.num_new_tokens for b in steps] == [[8], [8], [4], [1]]
    assert [b.samples(0) for b in steps[:1]] == [False]
    assert s.num_generated_tokens == 2


def test_stop_token_finishes_and_frees():
    sched = make(num_blocks=8)
    s = seq(0, 3, max_new=50)
    sched.add(s)
    sched.postprocess(sched.schedule(), [5])
    finished = sched.postprocess(sched.schedule(), [EOS])
    assert finished == [s] and s.finish_reason == "stop" and s.generated_token_ids == [5, EOS]
    assert sched.block_manager.num_free_blocks == 8 and not sched.has_unfinished()


def test_preemption_when_blocks_run_out_gives_identical_results():
    """Many sequences, a pool far too small for all of them at once: they are preempted and recomputed,
    and each ends with exactly the tokens it gets when it runs alone with plenty of room."""
    rng = random.Random(0)
    specs = [(rng.randint(3, 14), rng.randint(4, 12)) for _ in range(8)]
    alone = []
    for i, (plen, new) in enumerate(specs):
        sched = make(num_blocks=64)
        s = seq(i, plen, max_new=new)
        sched.add(s)
        run_to_completion(sched)
        alone.append(s.token_ids)

    sched = make(num_blocks=10, max_tokens=24)
    seqs = [seq(i, plen, max_new=new) for i, (plen, new) in enumerate(specs)]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched)
    assert sched.num_preemptions > 0, "the pool was meant to be too small"
    for s, expected in zip(seqs, alone):
        assert s.token_ids == expected, f"sequence {s.seq_id} changed under preemption"
        assert s.status is SequenceStatus.FINISHED and s.finish_reason == "length"
    assert sched.block_manager.num_free_blocks == 10
    assert all(b.ref_count == 0 for b in sched.block_manager.blocks)


def test_sequence_larger_than_the_pool_fails_alone():
    sched = make(num_blocks=4)
    too_big = seq(0, 40)  # 10 blocks
    ok = seq(1, 5, max_new=2)
    sched.add(too_big)
    sched.add(ok)
    run_to_completion(sched)
    assert too_big.finish_reason == "error" and "needs 10 KV-cache blocks" in too_big.error
    assert ok.finish_reason == "length" and ok.num_generated_tokens == 2
    assert sched.block_manager.num_free_blocks == 4


def test_growth_beyond_the_pool_by_one_sequence_fails_not_loops():
    sched = make(num_blocks=2)
    s = seq(0, 6, max_new=50)  # 2 blocks hold 8 tokens: it cannot grow past that
    sched.add(s)
    run_to_completion(sched)
    assert s.finish_reason == "error" and s.num_generated_tokens >= 2
    assert sched.block_manager.num_free_blocks == 2


def test_prompt_over_the_context_is_rejected():
    sched = make(num_blocks=8, max_len=10)
    try:
        sched.add(seq(0, 12))
    except ValueError as e:
        assert "context" in str(e)
    else:
        raise AssertionError("a prompt longer than the context was accepted")


def test_max_num_seqs_caps_the_batch():
    sched = make(num_blocks=64, max_seqs=2)
    for i in range(4):
        sched.add(seq(i, 3, max_new=2))
    batch = sched.schedule()
    assert len(batch) == 2 and len(sched.waiting) == 2
    run_to_completion(sched)
    assert sched.block_manager.num_free_blocks == 64


def test_finish_of_a_waiting_or_running_sequence_returns_blocks():
    sched = make(num_blocks=8)
    a, b = seq(0, 5), seq(1, 5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert sched.block_manager.num_free_blocks == 8 and not sched.has_unfinished()
