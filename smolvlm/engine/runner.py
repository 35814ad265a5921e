"""Turns one scheduled step into flat tensors, runs the model over the paged cache, samples.

A step is a flat list of N new tokens from B sequences (decodes first, then prefill chunks):
    input_ids, positions, slot_mapping  # (N,)
    block_tables                        # (B, max_blocks) int32
    seq_lens, cu_seqlens_q              # (B,), (B + 1,) int32
The model runs stage by stage, through its own methods: `embed` (token embeddings, image features
written at the step's image positions) -> `decode` (with `PagedAttention` and the engine's `ops`) ->
`logits` of the last token of each sequence that samples this step -> `Sampler`.

Image features are computed once per image (one vision-tower call for all its tiles) and kept in a
small LRU cache keyed by the image's content hash, so a prompt prefilled in chunks, recomputed after
preemption, or asked a second question about the same image or video does not run the tower again.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict

import torch

from smolvlm.engine.attention import AttentionMetadata, PagedAttention, vision_attention_for
from smolvlm.engine.cuda_graphs import CudaGraphDecoder
from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.outputs import TokenLogprob
from smolvlm.engine.sampler import Sampler
from smolvlm.engine.scheduler import ScheduledBatch
from smolvlm.engine.sequence import ImageSpan, Sequence
from smolvlm.ops import TORCH_OPS, Ops


class VisionFeatureCache:
    """content hash -> image features (n_tokens, hidden), least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is not None:
            self.entries.move_to_end(key)
        return features

    def clear(self) -> None:
        self.entries.clear()
        self.num_bytes = 0

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = features
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.num_bytes -= old.numel() * old.element_size()


class ModelRunner:
    def __init__(
        self,
        model,
        kv_cache: KVCache,
        backend,
        sampler: Sampler,
        vision_cache: VisionFeatureCache,
        ops: Ops = TORCH_OPS,
        graphs: CudaGraphDecoder | None = None,
        vision_tiles_per_pass: int | None = None,
    ):
        self.model = model
        self.ops = ops  # the few-row operations of every decoder call (smolvlm/ops.py)
        self.graphs = graphs  # replays decode-only steps on CUDA (cuda_graphs.py); None = always eager
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.vision_cache = vision_cache
        self.vision_tiles_per_pass = vision_tiles_per_pass  # EngineConfig.vision_tiles_per_pass
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.vision_attention = vision_attention_for(backend, self.device, model.config.vision.head_dim)
        self.num_vision_calls = 0
        self._no_image_positions = torch.empty(0, dtype=torch.int64, device=self.device)  # made once, not per step

    # ------------------------------------------------------------------ images

    @torch.inference_mode()  # no autograd graph: a cached feature tensor must not keep the tower's activations alive
    def image_features(self, span: ImageSpan) -> torch.Tensor:
        """(n_tiles * image_seq_len, hidden) for one image, from the cache or the vision tower."""
        features = self.vision_cache.get(span.content_hash)
        if features is None:
            image = span.image  # request.ImageInput
            pixels = image.pixel_values.to(self.device)
            mask = None if image.pixel_attention_mask is None else image.pixel_attention_mask.to(self.device)
            options = {"tiles_per_pass": self.vision_tiles_per_pass}
            if self.vision_attention is not None:
                options["attention"] = self.vision_attention
            features = self.model.image_features(pixels, mask, **options)  # (n_tiles, image_seq_len, hidden)
            self.num_vision_calls += 1
            features = features.reshape(-1, features.shape[-1])  # (n_tiles * image_seq_len, hidden)
            self.vision_cache.put(span.content_hash, features)
        return features

    def image_inputs(self, seq: Sequence, start: int, end: int) -> tuple[list[int], torch.Tensor] | None:
        """The prompt positions of the <image> tokens among [start, end) of `seq`, and their features
        (len(positions), hidden), in order; None when the range holds no image token."""
        positions: list[int] = []
        rows = []
        for span in seq.images:
            if span.end <= start or span.start >= end:
                continue
            own = span.token_positions
            first, last = bisect.bisect_left(own, start), bisect.bisect_left(own, end)
            if first < last:
                positions.extend(own[first:last])
                rows.append(self.image_features(span)[first:last])
        if not rows:
            return None
        return positions, rows[0] if len(rows) == 1 else torch.cat(rows)

    # ------------------------------------------------------------------ one step

    def build_metadata(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            seq_lens.append(start + n)
        metadata = AttentionMetadata.build(
            slots, [seq.block_table for seq in batch.seqs], batch.num_new_tokens, seq_lens, self.device
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return ids, pos, metadata

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, images: list[tuple[list[int], torch.Tensor] | None]
    ) -> tuple[list[int | None], dict[int, str], dict[int, TokenLogprob]]:
        """Run the model over the step's tokens. Returns the sampled token of each entry that reaches
        its end (else None), the entries whose logits were not finite (index -> message): those
        sample nothing and must fail, alone, and the log-probabilities of the sampled tokens whose
        request asked for them (index -> TokenLogprob). `images[i]`: entry i's image positions and
        features (from `image_inputs`), or None."""
        input_ids, positions, metadata = self.build_metadata(batch)  # (N,), (N,)
        sampling = [i for i in range(len(batch)) if batch.samples(i)]
        decode_only = batch.num_decodes == len(batch) == len(sampling) and all(e is None for e in images)
        if self.graphs is not None and decode_only and self.graphs.can_run(len(batch)):
            # Every entry is one plain token and samples: the captured graph computes exactly this.
            logits = self.graphs.run(input_ids, positions, metadata)  # (B, vocab)
        else:
            embeds = self.model.embed(input_ids, *self._flat_images(batch, images))  # (N, hidden)
            attention = PagedAttention(self.kv_cache, metadata, self.backend)
            hidden = self.model.decode(embeds, positions, attention, self.ops)  # (N, hidden)
            if not sampling:
                return [None] * len(batch), {}, {}
            ends = list(itertools.accumulate(metadata.query_lens))  # entry i's last token is at ends[i] - 1
            last = torch.tensor([ends[i] - 1 for i in sampling], device=self.device)
            logits = self.model.logits(hidden[last], self.ops).float()  # (S, vocab)
        failed: dict[int, str] = {}
        finite = torch.isfinite(logits).all(dim=-1)  # (S,)
        if not bool(finite.all()):  # a NaN / inf row would sample garbage (argmax of NaN is arbitrary)
            rows = finite.tolist()
            failed = {i: f"request {batch.seqs[i].seq_id}: the model's logits are not finite (NaN or inf)"
                      for i, ok in zip(sampling, rows) if not ok}
            logits = logits[finite]
            sampling = [i for i, ok in zip(sampling, rows) if ok]
        out: list[int | None] = [None] * len(batch)
        if sampling:
            seqs = [batch.seqs[i] for i in sampling]
            tokens = self.sampler(logits, [s.seq_id for s in seqs], [s.params for s in seqs], [s.token_ids for s in seqs])
            for i, token in zip(sampling, tokens):
                if token is None:  # its sampling settings turned finite logits into non-finite probabilities
                    p = batch.seqs[i].params
                    failed[i] = (f"request {batch.seqs[i].seq_id}: no token could be sampled: temperature "
                                 f"{p.temperature:g} / repetition_penalty {p.repetition_penalty:g} overflow the logits")
                out[i] = token
            logprobs = _logprobs(logits, tokens, [s.params.logprobs for s in seqs])
            return out, failed, {sampling[j]: lp for j, lp in logprobs.items()}
        return out, failed, {}

    def _flat_images(
        self, batch: ScheduledBatch, images: list[tuple[list[int], torch.Tensor] | None]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The step's image features (R, hidden) and their indices among its N flat tokens (R,), for
        `SmolVLM.embed`; (None, no indices) when no entry holds an image token. Only the positions the
        engine gave to images are merged: a *generated* `<image>` token (a random model can emit one) keeps its
        plain embedding, as in transformers' `generate`, where only the prompt is merged."""
        flat_index: list[int] = []
        rows = []
        offset = 0
        for seq, n, entry in zip(batch.seqs, batch.num_new_tokens, images):
            if entry is not None:
                start = seq.num_computed_tokens
                flat_index.extend(offset + p - start for p in entry[0])
                rows.append(entry[1])
            offset += n
        if not rows:
            return None, self._no_image_positions
        features = rows[0] if len(rows) == 1 else torch.cat(rows)  # (R, hidden)
        return features, torch.tensor(flat_index, dtype=torch.int64, device=self.device)


def _logprobs(logits: torch.Tensor, tokens: list[int | None], wanted: list[int | None]) -> dict[int, TokenLogprob]:
    """Row j -> its sampled token's log-probability and its `wanted[j]` most likely alternatives, for
    the rows that asked (`wanted[j]` not None) and sampled a token. logits (S, vocab) fp32, raw."""
    rows = [j for j, (k, t) in enumerate(zip(wanted, tokens)) if k is not None and t is not None]
    if not rows:
        return {}
    logp = logits[rows].log_softmax(dim=-1)  # (W, vocab)
    chosen = logp.gather(1, torch.tensor([[tokens[j]] for j in rows], device=logp.device))[:, 0].tolist()  # (W,)
    k = max(wanted[j] for j in rows)
    top_values, top_ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))  # (W, k)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return {
        j: TokenLogprob(tokens[j], chosen[n], tuple(zip(top_ids[n][: wanted[j]], top_values[n][: wanted[j]])))
        for n, j in enumerate(rows)
    }
