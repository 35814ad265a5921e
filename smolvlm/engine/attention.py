"""Decoder attention over the paged KV cache: the metadata of one step, and two backends.

The decoder (text.py) calls `attention(layer_idx, q, k, v, scale)` with the step's tokens flattened:
q (N, Hq, D), k/v (N, Hkv, D), already rotated. `PagedAttention` stores k/v into the cache slots of
those tokens, then attends each new token over its sequence's whole context (cached prefix + new
tokens, causal). The batch is ordered decodes first (one token each), then prefill chunks, so each
half goes to the routine made for it.

Backends (`attention_backend=`), same cache layout, swappable:
  "torch"   plain PyTorch (SDPA) on any device; the reference the engine is tested with;
  "triton"  the kernels of `smolvlm_kernels` (GPU, or CPU under TRITON_INTERPRET=1);
  "cpu"     torch, with the KV store and decode attention in `smolvlm_cpu_kernels.CpuKernels` (C);
  "auto"    triton on CUDA when it imports; on CPU, cpu when the engine has the C kernels, else torch.
Everything a backend needs arrives in `AttentionMetadata` (built by `AttentionMetadata.build`, the one
place host-side lists become the step's tensors); nothing is global.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import torch

from smolvlm.engine.kv_cache import KVCache
from smolvlm.linear import scaled_dot_product_attention


@dataclass
class AttentionMetadata:
    """Where the step's tokens go and what they see. B sequences, N new tokens in all."""

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token, -1 = store nothing
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0 past each sequence's blocks
    seq_lens: torch.Tensor  # (B,) int32: context length after this step (cached + new tokens)
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32: new tokens of sequence b are [cu[b], cu[b+1])
    num_decodes: int  # sequences 0..num_decodes-1 have exactly one new token (tokens 0..num_decodes-1)
    # Host copies, so the torch backend can slice without reading device tensors back.
    query_lens: list[int]
    seq_lens_host: list[int]

    @classmethod
    def build(
        cls,
        slot_mapping: list[int] | torch.Tensor,
        block_tables: list[list[int]] | torch.Tensor,
        query_lens: list[int],
        seq_lens: list[int],
        device: torch.device,
        seq_lens_tensor: torch.Tensor | None = None,
    ) -> "AttentionMetadata":
        """The metadata of one step from host-side lists (or tensors the caller keeps, e.g. the static
        buffers of a CUDA graph). The leading sequences with one new token each take the decode
        routine, every one after them the prefill routine (which handles any length). Block tables
        given as lists may be ragged; they are padded with block 0, which is never read."""
        num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
        if not isinstance(block_tables, torch.Tensor):
            width = max(len(t) for t in block_tables)
            block_tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32, device=device)
        if not isinstance(slot_mapping, torch.Tensor):
            slot_mapping = torch.tensor(slot_mapping, dtype=torch.int64, device=device)
        if seq_lens_tensor is None:
            seq_lens_tensor = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        return cls(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens_tensor,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            num_decodes=num_decodes,
            query_lens=list(query_lens),
            seq_lens_host=list(seq_lens),
        )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class TorchBackend:
    """Paged attention in plain PyTorch: gather each sequence's K/V through its block table, then SDPA."""

    name = "torch"

    def store_kv(self, key, value, k_cache, v_cache, metadata: AttentionMetadata) -> None:
        # key/value (N, Hkv, D) -> flat slots of [num_blocks * block_size, Hkv, D]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, metadata.slot_mapping, key.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, metadata.slot_mapping, value.to(v_cache.dtype))

    def decode(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """q (B, Hq, D), one token per sequence -> (B, Hq, D)."""
        b = q.shape[0]
        block_size = k_cache.shape[1]
        lens = metadata.seq_lens_host[:b]
        if b == 1 or b * max(lens) > 2 * sum(lens) + 64 * b:
            # One sequence, or lengths so uneven (a long video next to short chats) that padding every
            # context to the longest would mostly copy padding: each sequence alone, exact context.
            outs = [
                self._attend_one(q[i : i + 1], k_cache, v_cache, metadata.block_tables[i], 1, lens[i], scale)
                for i in range(b)
            ]
            return outs[0] if b == 1 else torch.cat(outs)
        num_blocks = (max(lens) + block_size - 1) // block_size
        table = metadata.block_tables[:b, :num_blocks].long()  # (B, M)
        k = k_cache[table].flatten(1, 2)  # (B, M*bs, Hkv, D)
        v = v_cache[table].flatten(1, 2)
        key_pos = torch.arange(k.shape[1], device=q.device)
        visible = key_pos[None, :] < metadata.seq_lens[:b, None]  # (B, M*bs)
        # The slots past each sequence's end hold whatever their block last held; zero them in these
        # copies, or a NaN there (left by a failed request) would give `0 * NaN = NaN` in the sum.
        hidden = ~visible[:, :, None, None]  # (B, M*bs, 1, 1)
        k.masked_fill_(hidden, 0)
        v.masked_fill_(hidden, 0)
        out = scaled_dot_product_attention(
            q[:, :, None, :],  # (B, Hq, 1, D)
            k.transpose(1, 2),  # (B, Hkv, M*bs, D)
            v.transpose(1, 2),
            attn_mask=visible[:, None, None, :],  # (B, 1, 1, M*bs)
            scale=scale,
            enable_gqa=True,
        )  # (B, Hq, 1, D)
        return out[:, :, 0, :]

    def prefill(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """q (Np, Hq, D): the prefill chunks (sequences num_decodes..B-1) -> (Np, Hq, D)."""
        if metadata.num_seqs - metadata.num_decodes == 1:
            b = metadata.num_seqs - 1
            return self._attend_one(q, k_cache, v_cache, metadata.block_tables[b], metadata.query_lens[b], metadata.seq_lens_host[b], scale)
        out = torch.empty_like(q)
        start = 0
        for b in range(metadata.num_decodes, metadata.num_seqs):
            q_len = metadata.query_lens[b]
            out[start : start + q_len] = self._attend_one(
                q[start : start + q_len], k_cache, v_cache, metadata.block_tables[b], q_len, metadata.seq_lens_host[b], scale
            )
            start += q_len
        return out

    @staticmethod
    def _attend_one(q, k_cache, v_cache, block_table, q_len: int, k_len: int, scale: float) -> torch.Tensor:
        """One sequence: q (Tq, Hq, D), the last Tq of its k_len context tokens -> (Tq, Hq, D), causal."""
        block_size = k_cache.shape[1]
        table = block_table[: (k_len + block_size - 1) // block_size].long()
        k = k_cache[table].flatten(0, 1)[:k_len]  # (Tk, Hkv, D)
        v = v_cache[table].flatten(0, 1)[:k_len]
        qb = q.transpose(0, 1)[None]  # (1, Hq, Tq, D)
        kb, vb = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, Hkv, Tk, D)
        if q_len == 1 or q_len == k_len:  # one query sees everything / nothing cached before: plain causal
            o = scaled_dot_product_attention(qb, kb, vb, is_causal=q_len > 1, scale=scale, enable_gqa=True)
        else:  # causal, bottom-right aligned: query i sees keys j <= i + (Tk - Tq)
            rows = torch.arange(q_len, device=q.device)[:, None]
            cols = torch.arange(k_len, device=q.device)[None, :]
            mask = cols <= rows + (k_len - q_len)  # (Tq, Tk)
            o = scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)  # (Tq, Hq, D)


class TritonBackend:
    """The `smolvlm_kernels` launchers, same layout; imported lazily (triton is optional)."""

    name = "triton"

    def __init__(self):
        import smolvlm_kernels
        from smolvlm_kernels import store_kv  # noqa: F401  (imports triton now: a missing one fails here)

        self.kernels = smolvlm_kernels

    def store_kv(self, key, value, k_cache, v_cache, metadata: AttentionMetadata) -> None:
        self.kernels.store_kv(key, value, k_cache, v_cache, metadata.slot_mapping)

    def decode(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        b = q.shape[0]
        return self.kernels.paged_decode_attention(
            q, k_cache, v_cache, metadata.block_tables[:b], metadata.seq_lens[:b], scale=scale
        )

    def prefill(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        d = metadata.num_decodes
        cu = metadata.cu_seqlens_q[d:] - d  # the prefill tokens start after the d decode tokens
        return self.kernels.paged_prefill_attention(
            q, k_cache, v_cache, metadata.block_tables[d:], cu, metadata.seq_lens[d:],
            max(metadata.query_lens[d:]), scale=scale,
        )


class CpuBackend(TorchBackend):
    """TorchBackend with the KV store and the decode half in `smolvlm_cpu_kernels.CpuKernels` (C): one call
    each per layer where the torch path gathers the context and runs SDPA and ~10 small ops around it.
    Prefill chunks (many query rows) keep SDPA."""

    name = "cpu"

    def __init__(self, kernels):
        self.kernels = kernels

    def store_kv(self, key, value, k_cache, v_cache, metadata: AttentionMetadata) -> None:
        self.kernels.store_kv(key, value, k_cache, v_cache, metadata.slot_mapping)

    def decode(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        b = q.shape[0]
        return self.kernels.paged_decode_attention(
            q, k_cache, v_cache, metadata.block_tables[:b], metadata.seq_lens[:b], scale
        )


def vision_attention_for(backend, device: torch.device, head_dim: int):
    """The vision tower's attention to go with `backend`: the Triton masked-attention kernel on CUDA
    when it takes this head size (a power of two in 16..256), else None (the tower's SDPA default;
    also under the CPU interpreter, where the kernel would only be slow)."""
    supported = 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    if backend.name == "triton" and device.type == "cuda" and supported:
        return backend.kernels.masked_attention
    return None


def make_backend(
    name: str, device: torch.device, cpu_kernels=None, dtype: torch.dtype = torch.float32
) -> TorchBackend | TritonBackend:
    """`cpu_kernels`: the engine's `CpuKernels` (CPU only; None when it runs decode steps in PyTorch).
    `dtype`: the KV cache's (the C decode attention takes float32 and bfloat16)."""
    c_dtype = dtype in (torch.float32, torch.bfloat16)
    if name == "torch":
        return TorchBackend()
    if name == "cpu":
        if device.type != "cpu" or cpu_kernels is None:
            raise ValueError(
                "attention_backend='cpu' needs a CPU model and the C decode kernels (cpu_kernels='c' or 'auto')"
            )
        if not c_dtype:
            raise ValueError(f"attention_backend='cpu' takes float32 or bfloat16 models, not {dtype}; use 'torch'")
        return CpuBackend(cpu_kernels)
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"attention_backend='triton' runs on CUDA (on CPU only in Triton's interpreter, TRITON_INTERPRET=1, "
                f"for testing); this model is on {device.type}: use 'auto'"
            )
        try:
            return TritonBackend()
        except ImportError as e:
            raise RuntimeError(
                f"attention_backend='triton' needs triton and the smolvlm_kernels package ({e}); "
                "use attention_backend='torch'"
            ) from None
    if name == "auto":
        if device.type == "cuda":
            try:
                return TritonBackend()
            except ImportError:
                pass
        if device.type == "cpu" and cpu_kernels is not None and c_dtype:
            return CpuBackend(cpu_kernels)
        return TorchBackend()
    raise ValueError(f"attention_backend must be 'auto', 'torch', 'triton' or 'cpu', got {name!r}")


class PagedAttention:
    """The attention function the decoder calls in one engine step (see text.AttentionFn)."""

    def __init__(self, cache: KVCache, metadata: AttentionMetadata, backend):
        self.cache = cache
        self.metadata = metadata
        self.backend = backend

    def fused_decode(self, layer_idx: int, num_tokens: int):
        """For a whole-layer decode kernel (ops.KernelOps.decoder_layer): (k_cache, v_cache, slot_mapping,
        block_tables, seq_lens) of this layer and step, when the step is all decodes, one token per
        sequence, and the attention would run on the C backend (the kernel runs the same C attention);
        else None."""
        md = self.metadata
        if not isinstance(self.backend, CpuBackend) or md.num_decodes != md.num_seqs or num_tokens != md.num_seqs:
            return None
        k_cache, v_cache = self.cache.layer(layer_idx)
        b = md.num_seqs
        return k_cache, v_cache, md.slot_mapping[:b], md.block_tables[:b], md.seq_lens[:b]

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q (N, Hq, D), k/v (N, Hkv, D); scale: the model's (text.Attention.scale)
        k_cache, v_cache = self.cache.layer(layer_idx)
        md = self.metadata
        self.backend.store_kv(k, v, k_cache, v_cache, md)
        d = md.num_decodes
        if d == md.num_seqs:
            return self.backend.decode(q, k_cache, v_cache, md, scale)
        if d == 0:
            return self.backend.prefill(q, k_cache, v_cache, md, scale)
        return torch.cat(
            [self.backend.decode(q[:d], k_cache, v_cache, md, scale),
             self.backend.prefill(q[d:], k_cache, v_cache, md, scale)]
        )
