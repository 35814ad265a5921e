"""Decode steps replayed from captured CUDA graphs (GPU, triton backend only).

At batch 1 a decode step of the 256M model is ~450 small kernels: on an H100 launching them takes
~10x longer than running them. Capturing the whole step (embeddings -> decoder over the paged cache
-> logits) once per batch size and replaying it removes that overhead (the vLLM / nano-vllm recipe).

What makes a step capturable: every tensor it reads lives in a static buffer filled before replay,
and nothing depends on host-side values. So the block tables have a fixed width (the longest
possible sequence), padding rows store nothing (slot -1) and attend over one token, and the Triton
decode kernel bounds its work by the table width rather than a host-side maximum length.
Steps with a prefill chunk (or more sequences than the largest graph) run eagerly.

A graph replays the kernels it captured, reading the memory the weights had then: a replaced
parameter, a wrapped or hooked module would not be seen. So the graphs remember the model's
`fingerprint()` and are captured again, before the next replay, when it changed.
"""

from __future__ import annotations

import torch

from smolvlm.engine.attention import AttentionMetadata, PagedAttention
from smolvlm.engine.kv_cache import KVCache
from smolvlm.ops import TORCH_OPS, Ops

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class CudaGraphDecoder:
    def __init__(self, model, kv_cache: KVCache, backend, max_batch: int, max_model_len: int, ops: Ops = TORCH_OPS):
        if backend.name != "triton":
            raise ValueError("CUDA graphs need the triton attention backend (the torch one reads host-side lengths)")
        device = model.device
        self.sizes = [s for s in BATCH_SIZES if s < max_batch] + [max_batch]
        self.max_batch = max_batch
        width = (max_model_len + kv_cache.block_size - 1) // kv_cache.block_size
        # Static inputs, shared by every graph (a graph of size s reads the first s rows).
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_batch, width, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._model, self._kv_cache, self._backend, self._ops, self._width = model, kv_cache, backend, ops, width
        self._no_images = torch.empty(0, dtype=torch.int64, device=device)
        self._capture()

    def _capture(self) -> None:
        model, kv_cache, backend, ops, width = self._model, self._kv_cache, self._backend, self._ops, self._width
        device = model.device
        self.graphs.clear()
        self.fingerprint = model.fingerprint()
        pool = None
        for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory pool
            context = width * kv_cache.block_size
            metadata = AttentionMetadata.build(
                self.slot_mapping[:size], self.block_tables[:size], [1] * size, [context] * size, device,
                seq_lens_tensor=self.seq_lens[:size],
            )
            attention = PagedAttention(kv_cache, metadata, backend)

            def step(size=size, attention=attention):
                # The model's own stages, as in an eager step (no image rows: a decode step has none).
                embeds = model.embed(self.input_ids[:size], None, self._no_images)  # (size, hidden)
                hidden = model.decode(embeds, self.positions[:size], attention, ops)
                return model.logits(hidden, ops).float()  # (size, vocab)

            with torch.inference_mode():
                step()  # compiles the Triton kernels, warms the allocator; stores nothing (slots -1)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = step()
            pool = graph.pool()
            self.graphs[size] = (graph, logits)

    def can_run(self, num_seqs: int) -> bool:
        """Whether a decode step of `num_seqs` sequences can replay a graph (captured again first if
        the model changed since)."""
        if num_seqs > self.max_batch:
            return False
        if self._model.fingerprint() != self.fingerprint:
            self._capture()
        return True

    def run(self, input_ids, positions, metadata: AttentionMetadata) -> torch.Tensor:
        """One decode step of B sequences from the eager metadata -> logits (B, vocab) fp32."""
        b = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= b)
        width = metadata.block_tables.shape[1]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(metadata.slot_mapping)
        self.slot_mapping[b:size].fill_(-1)  # padding rows store nothing...
        self.seq_lens[:b].copy_(metadata.seq_lens)
        self.seq_lens[b:size].fill_(1)  # ...and attend over one (ignored) token
        self.block_tables[:b, :width].copy_(metadata.block_tables)  # entries past a row's length are never read
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:b]

