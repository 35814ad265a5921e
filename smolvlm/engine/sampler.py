"""Next-token choice from the last position's logits, one row per sampling sequence.

Order and semantics follow transformers' logits processors (generation/logits_process.py, as
`generate` chains them): repetition penalty -> temperature -> top-k -> top-p -> sample.
Greedy (temperature 0) is a plain argmax after the repetition penalty, so it stays deterministic and
token-identical to `generate(do_sample=False)`. A request with a `seed` owns a torch.Generator: its
samples do not depend on which other requests share the batch.
"""

from __future__ import annotations

import torch

from smolvlm.engine.params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,), token_ids (T,) already in the sequence: divide positive scores by the penalty,
    multiply negative ones (transformers: RepetitionPenaltyLogitsProcessor)."""
    score = logits.gather(0, token_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, token_ids, score)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits (ties with the k-th kept), -inf elsewhere (TopKLogitsWarper)."""
    top_k = min(top_k, logits.shape[-1])
    threshold = torch.topk(logits, top_k).values[..., -1, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (TopPLogitsWarper)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its own RNG, for seeded requests

    def add(self, seq_id: int, params: SamplingParams) -> None:
        if params.seed is not None and not params.greedy:
            self.generators[seq_id] = torch.Generator(device=self.device).manual_seed(params.seed)

    def remove(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def __call__(
        self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams], token_ids: list[list[int]]
    ) -> list[int | None]:
        """logits (B, V) fp32 -> B token ids. `token_ids[b]`: sequence b so far (for the repetition penalty).
        None for a row whose settings made its scores non-finite (that request fails alone)."""
        if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            return logits.argmax(dim=-1).tolist()  # the common case: one op, one host sync
        chosen = []
        for b, p in enumerate(params):
            row = logits[b]  # (V,)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(token_ids[b], dtype=torch.long, device=row.device)
                row = apply_repetition_penalty(row, seen, p.repetition_penalty)
            if not p.greedy:
                row = row / p.temperature
            # a tiny temperature or penalty can overflow finite logits: +inf or NaN scores, or none left finite
            if bool(torch.isnan(row).any() | (row == float("inf")).any()) or not bool(torch.isfinite(row).any()):
                chosen.append(None)  # no honest choice: this request fails alone
                continue
            if p.greedy:
                chosen.append(int(row.argmax()))
                continue
            if p.top_k:
                row = apply_top_k(row, p.top_k)
            if p.top_p < 1.0:
                row = apply_top_p(row, p.top_p)
            probs = row.softmax(dim=-1)
            chosen.append(int(torch.multinomial(probs, 1, generator=self.generators.get(seq_ids[b]))[0]))
        return chosen
