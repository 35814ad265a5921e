"""Turns one scheduled step into flat tensors, runs the model over the paged cache, samples.

A step is a flat list of N new tokens from B sequences (decodes first, then prefill chunks):
    input_ids, positions, slot_mapping  # (N,)
    block_tables                        # (B, max_blocks) int32
    seq_lens, cu_seqlens_q              # (B,), (B + 1,) int32
The model runs stage by stage: token embeddings with image features at the prompt's `<image>`
positions -> `decode` (with `PagedAttention`) -> `logits` of the last token of each sequence that
samples this step -> `Sampler`.

Image features are computed once per image (one vision-tower call for all its tiles) and kept in a
small LRU cache keyed by the image's content hash, so a prompt prefilled in chunks, recomputed after
preemption, or asked a second question about the same image or video does not run the tower again.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from smolvlm.engine.attention import AttentionMetadata, PagedAttention, vision_attention_for
from smolvlm.engine.cuda_graphs import CudaGraphDecoder
from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.sampler import Sampler
from smolvlm.engine.scheduler import ScheduledBatch
from smolvlm.engine.sequence import Sequence


@dataclass
class ImagePayload:
    """What the runner needs to compute one image's (or video's) features, kept with its ImageSpan."""

    pixel_values: torch.Tensor  # (n_tiles, 3, H, W), tiles (or frames) in prompt order
    pixel_attention_mask: torch.Tensor | None  # (n_tiles, H, W) or None (every pixel real)
    token_positions: list[int]  # prompt positions of its <image> tokens, n_tiles * image_seq_len of them


class VisionFeatureCache:
    """content hash -> image features (n_tokens, hidden), least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return features

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
        graphs: CudaGraphDecoder | None = None,
    ):
        self.model = model
        self.graphs = graphs  # replays decode-only steps on CUDA (cuda_graphs.py); None = always eager
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.vision_cache = vision_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.scale = model.config.text.head_dim**-0.5
        self.vision_attention = vision_attention_for(backend, self.device, model.config.vision.head_dim)
        self.num_vision_calls = 0

    # ------------------------------------------------------------------ images

    @torch.inference_mode()  # no autograd graph: a cached feature tensor must not keep the tower's activations alive
    def image_features(self, content_hash: str, payload: ImagePayload) -> torch.Tensor:
        """(n_tiles * image_seq_len, hidden) for one image, from the cache or the vision tower."""
        features = self.vision_cache.get(content_hash)
        if features is None:
            pixels = payload.pixel_values.to(self.device)
            mask = None if payload.pixel_attention_mask is None else payload.pixel_attention_mask.to(self.device)
            if self.vision_attention is None:
                features = self.model.image_features(pixels, mask)  # (n_tiles, image_seq_len, hidden)
            else:
                features = self.model.image_features(pixels, mask, attention=self.vision_attention)
            self.num_vision_calls += 1
            features = features.reshape(-1, features.shape[-1])  # (n_tiles * image_seq_len, hidden)
            if features.shape[0] != len(payload.token_positions):
                raise ValueError(
                    f"an image gives {features.shape[0]} features but its prompt has "
                    f"{len(payload.token_positions)} <image> tokens"
                )
            self.vision_cache.put(content_hash, features)
        return features

    def image_inputs(self, seq: Sequence, start: int, end: int) -> tuple[list[int], torch.Tensor] | None:
        """The prompt positions of the <image> tokens among [start, end) of `seq`, and their features
        (len(positions), hidden), in order; None when the range holds no image token."""
        positions: list[int] = []
        rows = []
        for span in seq.images:
            if span.end <= start or span.start >= end:
                continue
            own = span.payload.token_positions
            first, last = bisect.bisect_left(own, start), bisect.bisect_left(own, end)
            if first < last:
                positions.extend(own[first:last])
                rows.append(self.image_features(span.content_hash, span.payload)[first:last])
        if not rows:
            return None
        return positions, rows[0] if len(rows) == 1 else torch.cat(rows)

    # ------------------------------------------------------------------ one step

    def build_metadata(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start : start + n])
                positions.extend(range(start, start + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        dev = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            num_decodes=batch.num_decodes,
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(seq_lens),
            query_lens=query_lens,
            seq_lens_host=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, metadata

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, images: list[tuple[list[int], torch.Tensor] | None]
    ) -> list[int | None]:
        """Run the model over the step's tokens; the sampled token of each entry that reaches its end, else None.
        `images[i]`: entry i's image positions and features (from `image_inputs`), or None."""
        input_ids, positions, metadata = self.build_metadata(batch)  # (N,), (N,)
        sampling = [i for i in range(len(batch)) if batch.samples(i)]
        decode_only = batch.num_decodes == len(batch) == len(sampling) and all(e is None for e in images)
        if self.graphs is not None and decode_only and self.graphs.can_run(len(batch)):
            # Every entry is one plain token and samples: the captured graph computes exactly this.
            logits = self.graphs.run(input_ids, positions, metadata)  # (B, vocab)
        else:
            embeds = self.embed(batch, input_ids, images)  # (N, hidden)
            attention = PagedAttention(self.kv_cache, metadata, self.backend, self.scale)
            hidden = self.model.decode(embeds, positions, attention)  # (N, hidden)
            if not sampling:
                return [None] * len(batch)
            ends = list(itertools.accumulate(metadata.query_lens))  # entry i's last token is at ends[i] - 1
            last = [ends[i] - 1 for i in sampling]
            logits = self.model.logits(hidden[torch.tensor(last, device=self.device)]).float()  # (S, vocab)
        seqs = [batch.seqs[i] for i in sampling]
        tokens = self.sampler(
            logits,
            [s.seq_id for s in seqs],
            [s.params for s in seqs],
            [s.token_ids for s in seqs],
        )
        out: list[int | None] = [None] * len(batch)
        for i, token in zip(sampling, tokens):
            out[i] = token
        return out

    def embed(
        self, batch: ScheduledBatch, input_ids: torch.Tensor, images: list[tuple[list[int], torch.Tensor] | None]
    ) -> torch.Tensor:
        """Token embeddings, with image features written at the prompt's <image> positions.

        Same result as `SmolVLM.embed` (transformers: inputs_merger), but the positions are the ones the
        engine knows belong to images: a chunk may hold only part of an image, and a *generated*
        `<image>` token (a random model can emit one) has no features and keeps its plain embedding,
        as in transformers' `generate`, where only the prompt is merged.
        """
        embeds = self.model.model.text_model.embed_tokens(input_ids)  # (N, hidden)
        flat_index: list[int] = []
        rows = []
        offset = 0
        for seq, n, entry in zip(batch.seqs, batch.num_new_tokens, images):
            if entry is not None:
                start = seq.num_computed_tokens
                flat_index.extend(offset + p - start for p in entry[0])
                rows.append(entry[1])
            offset += n
        if rows:
            index = torch.tensor(flat_index, dtype=torch.int64, device=embeds.device)
            features = rows[0] if len(rows) == 1 else torch.cat(rows)  # (R, hidden)
            embeds = embeds.index_copy(0, index, features.to(embeds.dtype))
        return embeds
