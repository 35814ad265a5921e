"""Continuous batching: which sequences run in the next model step, and how many tokens each (pure Python).

After nano-vllm's Scheduler and vLLM v1's unified scheduler. Every step has a token budget
(`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`):

1. Running sequences first, oldest first: a decoding sequence needs one token (and maybe one new
   block); one still in prefill (a prompt longer than the budget) gets its next chunk. When the pool
   has no block left, the *newest* running sequence is preempted by recomputation: its blocks are
   freed, it goes back to the front of the waiting queue with all its tokens (prompt + generated so
   far) and will be prefilled again later (its prefix may still be cached). Nothing is corrupted and
   nothing crashes: at worst a sequence runs alone.
2. Then waiting sequences, in arrival order, while the budget, the cap and the pool allow (none when
   this step had to preempt). New requests thus join while others decode.

A sequence that can never fit (more blocks than the whole pool) is failed, not retried forever.
The batch lists single-token entries (decodes) first, then multi-token prefill chunks: the runner and
the attention backends rely on that order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from smolvlm.engine.block_manager import BlockManager
from smolvlm.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192  # prompt + generated tokens, at most the model's position range

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid scheduler limits: {self}")


@dataclass
class ScheduledBatch:
    """One model step: `seqs[i]` computes tokens [num_computed_tokens, + num_new_tokens[i])."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_decodes: int = 0  # the first `num_decodes` entries have exactly one new token
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # could not be scheduled at all (finished with an error)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether entry i reaches the end of its sequence this step, so a token is sampled for it."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"request {seq.seq_id}: the prompt has {seq.num_tokens} tokens, the model's context is "
                f"{self.config.max_model_len} (prompt + answer); shorten the prompt or use fewer frames"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, error: str | None = None, discard: bool = False) -> list[int]:
        """End `seq` now (stop condition met, failure, abort) and return its blocks to the pool; returns
        the blocks that became free. `discard=True`: its K/V is garbage (see BlockManager.free_sequence)."""
        if seq.status is SequenceStatus.FINISHED:
            return []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        freed = self.block_manager.free_sequence(seq, discard)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        return freed

    # ------------------------------------------------------------------ one step

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        batch = ScheduledBatch()

        # 1. Running sequences, oldest first; preempt the newest when the pool runs dry.
        queue = deque(self.running)
        kept: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.popleft()
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                kept.append(seq)
                chosen.append((seq, num_new))
                budget -= num_new
        kept.extend(queue)  # not reached this step (budget spent): still running
        self.running = kept

        # 2. Waiting sequences, if nothing had to be preempted.
        while self.waiting and not batch.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.allocate(seq):
                if not self.running:  # alone and still too big: it can never run
                    self.waiting.popleft()
                    self._fail_too_big(seq)
                    batch.failed.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            chosen.append((seq, num_new))
            budget -= num_new

        # Decodes (one token) first, then prefill chunks.
        chosen.sort(key=lambda entry: entry[1] != 1)
        batch.seqs = [seq for seq, _ in chosen]
        batch.num_new_tokens = [n for _, n in chosen]
        batch.num_decodes = sum(1 for n in batch.num_new_tokens if n == 1)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop the K/V (blocks go back to the pool), requeue at the front."""
        self.running.remove(seq) if seq in self.running else None
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _fail_too_big(self, seq: Sequence) -> None:
        needed = seq.num_blocks_for(seq.num_tokens)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "error"
        seq.error = (
            f"request {seq.seq_id} needs {needed} KV-cache blocks ({seq.num_tokens} tokens) but the pool has only "
            f"{self.block_manager.num_blocks}; give the engine more KV-cache memory"
        )

    # ------------------------------------------------------------------ after the model ran

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Advance each entry by its computed tokens, append its sampled token, apply the token-level
        stop rules (stop/eos token, max_new_tokens, context length). Returns the sequences that finished."""
        finished = []
        for i, seq in enumerate(batch.seqs):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # failed or aborted during the step
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.block_manager.commit(seq)
            token = sampled[i]
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = None
            if token in seq.stop_token_ids and not seq.params.ignore_eos:
                reason = "stop"
            elif seq.num_generated_tokens >= seq.params.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
                reason = "length"
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished
