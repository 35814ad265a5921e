"""SmolVLM: vision tower -> connector -> image features merged into the decoder's token embeddings.

Matches `SmolVLMForConditionalGeneration` / `SmolVLMModel`
(transformers/models/smolvlm/modeling_smolvlm.py). Read `SmolVLM.forward` top to bottom: it is the
whole pipeline. Each stage is also a method of its own (`image_features`, `embed`, `decode`,
`logits`) so tests and experiments can call one stage alone.

Module names follow the checkpoint's tensor names: `model.vision_model`, `model.connector`,
`model.text_model`, `lm_head`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from smolvlm.config import SmolVLMConfig
from smolvlm.connector import Connector
from smolvlm.linear import Linear, call_with_ops
from smolvlm.ops import TORCH_OPS, Ops
from smolvlm.text import AttentionFn, CausalAttention, TextModel
from smolvlm.vision import VisionAttentionFn, VisionTransformer, patch_mask_from_pixels, sdpa_attention
from smolvlm.weights import huge_page_arena, load_weights, release_freed_memory, resolve_checkpoint


def _dtype(dtype) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    if dtype not in names.values():
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (or their names), got {dtype!r}")
    return dtype


class ImageTokenMismatchError(ValueError):
    """The number of `<image>` tokens in the prompt differs from the number of image features."""


class SmolVLMModel(nn.Module):
    """The three sub-networks, under the names the checkpoint uses (`model.*`)."""

    def __init__(self, config: SmolVLMConfig):
        super().__init__()
        self.vision_model = VisionTransformer(config.vision)
        self.connector = Connector(config)
        self.text_model = TextModel(config.text)


class SmolVLM(nn.Module):
    def __init__(self, config: SmolVLMConfig):
        super().__init__()
        self.config = config
        self.model = SmolVLMModel(config)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantize: str | None = None,
    ) -> "SmolVLM":
        """Load a checkpoint directory (or hub repo id): config.json + safetensors, strictly.
        dtype: a torch dtype, or its name ("float32", "bfloat16", "float16").
        quantize: None, or "int8": the decoder's projections and the LM head become int8 with a scale
        per group of 32 (smolvlm/quant.py), quantized here from the checkpoint's weights; everything
        else stays in `dtype`. Opt-in and never silent: its accuracy is in docs/benchmarks.md."""
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        dtype = _dtype(dtype)
        directory = resolve_checkpoint(path_or_repo_id)
        config = SmolVLMConfig.from_file(directory / "config.json")
        with torch.device("meta"):  # no random init, no memory until the real tensors arrive
            model = cls(config)
        if config.tie_word_embeddings:
            del model.lm_head.weight  # filled from embed_tokens below; not expected in the file
        # On CPU, weights go into one huge-page-backed buffer (weights.huge_page_arena): those converted
        # to `dtype`, and those a decode step streams (decoder layers, final norm, LM head), which are
        # read faster from huge pages; the rest stay memory-mapped from the file.
        arena, streamed = None, frozenset()
        if torch.device(device).type == "cpu" and quantize is None:  # int8: the fp32 weights are transient
            arena = huge_page_arena(model, dtype)
            prefixes = ("model.text_model.layers.", "model.text_model.norm.", "lm_head.")
            if config.tie_word_embeddings:  # the LM head reads the embedding matrix
                prefixes += ("model.text_model.embed_tokens.",)
            streamed = frozenset(name for name in arena if name.startswith(prefixes))
        load_weights(model, directory, dtype=dtype, device=device, into=arena, always_into=streamed)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.text_model.embed_tokens.weight
        model.model.text_model.rotary_emb.to(device)  # computed buffer, built on CPU in fp32
        if quantize == "int8":  # before packing, which would copy the fp32 q/k/v and gate/up weights
            from smolvlm.quant import quantize_decoder

            quantize_decoder(model)
        model.model.text_model.pack_projections()  # q/k/v and gate/up back to back: one matmul each (text.py)
        release_freed_memory()  # the per-tensor conversion copies
        return model.eval()

    def fingerprint(self) -> tuple:
        """A value that changes whenever what the model computes may have: a module replaced or given a
        hook, a parameter or buffer replaced or moved, or edited in place (its version counter; an edit through
        `.data` bypasses the counter and is not seen). Caches of computed values (an engine's prefix
        and vision-feature caches, captured CUDA graphs) compare it to know when they are stale."""
        modules = tuple((id(m), bool(m._forward_hooks or m._forward_pre_hooks)) for m in self.modules())
        tensors = (*self.parameters(), *self.buffers())  # buffers: int8 weights and their scales (quant.py)
        return modules, tuple((id(p), p.data_ptr(), p._version) for p in tensors)

    # ------------------------------------------------------------------ research (smolvlm/research)

    def hook_names(self) -> list[str]:
        """Every hook point: module names (the checkpoint's) and the HookPoints (hookpoint.py)."""
        from smolvlm.research import hook_names

        return hook_names(self)

    def run_with_cache(self, input_ids, pixel_values=None, pixel_attention_mask=None, names=None, **options):
        """(logits, cache of hook point -> tensor); see smolvlm.research.run_with_cache."""
        from smolvlm.research import run_with_cache

        return run_with_cache(self, input_ids, pixel_values, pixel_attention_mask, names=names, **options)

    def hooks(self, fns):
        """`with model.hooks({name: fn}): ...`, fn(tensor, name) -> replacement or None; see smolvlm.research.hooks."""
        from smolvlm.research import hooks

        return hooks(self, fns)

    # ------------------------------------------------------------------ stages

    @property
    def device(self) -> torch.device:
        return self.model.text_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:  # of the activations (int8 weights, quant.py, keep them in this dtype)
        return self.model.text_model.embed_tokens.weight.dtype

    def image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        attention: VisionAttentionFn = sdpa_attention,
        *,
        checkpoint: bool = False,
        tiles_per_pass: int | None = None,
    ) -> torch.Tensor:
        """Tiles -> decoder-sized image tokens, (n_real_tiles, image_seq_len, hidden).

        pixel_values (B, N, 3, H, W) as the processor gives them (or (N, 3, H, W)); all-zero tiles
        are batch padding and are dropped first (transformers: get_image_features). `attention`:
        the tower's attention (SDPA, or `smolvlm_kernels.masked_attention` on GPU). `checkpoint`:
        gradient checkpointing per vision layer (training). `tiles_per_pass`: run the tower and the
        connector over at most this many tiles at a time (None: all at once). Tiles never attend to
        each other, so the result is the same; the activations held at once (~25 MB per 512² tile in
        fp32: a 64-frame video needs 1.6 GB in one pass) are bounded by it.
        """
        if tiles_per_pass is not None and tiles_per_pass < 1:
            raise ValueError(f"tiles_per_pass must be >= 1 or None, got {tiles_per_pass}")
        tiles, pixel_mask = self._real_tiles(pixel_values, pixel_attention_mask)
        patch_mask = patch_mask_from_pixels(pixel_mask, self.config.vision.patch_size)  # (N, Hp, Wp)
        n = tiles.shape[0]
        step = n if tiles_per_pass is None else tiles_per_pass
        parts = []
        for chunk in [slice(None)] if step >= n else [slice(i, i + step) for i in range(0, n, step)]:
            patch_features = self.vision_features(tiles[chunk], patch_mask[chunk], attention, checkpoint=checkpoint)  # (n, Hp*Wp, Dv)
            parts.append(self.model.connector(patch_features))  # (n, image_seq_len, D)
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # (N, image_seq_len, D)

    def vision_features(
        self,
        tiles: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        attention: VisionAttentionFn = sdpa_attention,
        *,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """The SigLIP tower alone: (N, 3, H, W) -> (N, Hp*Wp, Dv)."""
        return self.model.vision_model(tiles.to(self.dtype), patch_attention_mask, attention, checkpoint=checkpoint)

    def _real_tiles(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[None]
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values should be (B, N, C, H, W), got shape {tuple(pixel_values.shape)}")
        b, n, c, h, w = pixel_values.shape
        tiles = pixel_values.reshape(b * n, c, h, w)
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(b * n, h, w, dtype=torch.bool, device=tiles.device)
        else:
            if tuple(pixel_attention_mask.shape[-2:]) != (h, w) or pixel_attention_mask.numel() != b * n * h * w:
                raise ValueError(
                    f"pixel_attention_mask shape {tuple(pixel_attention_mask.shape)} does not match "
                    f"pixel_values {tuple(pixel_values.shape)}"
                )
            pixel_mask = pixel_attention_mask.reshape(b * n, h, w).bool()
        real = (tiles != 0).flatten(1).any(dim=1)  # (B*N,) False for all-zero padding tiles
        if not bool(real.any()):
            real[0] = True  # transformers keeps one tile rather than run the tower on nothing
        return tiles[real], pixel_mask[real]

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        image_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written at the image positions, in order.

        input_ids (...,) -> (..., hidden). image_features (n_tiles, image_seq_len, hidden) or
        (n_rows, hidden), or None. image_positions (n_rows,) int64 indexes the flattened input_ids
        (the engine knows which tokens belong to images: a chunk may hold part of an image, and a
        *generated* `<image>` token has no features); None means every `<image>` token, in prompt
        order (transformers: SmolVLMModel.inputs_merger). The counts must agree.
        """
        embeds = self.model.text_model.embed_tokens(input_ids)  # (..., hidden)
        if image_positions is None:
            image_positions = (input_ids.reshape(-1) == self.config.image_token_id).nonzero().squeeze(1)
        n_rows = 0 if image_features is None else image_features.numel() // image_features.shape[-1]
        if image_positions.numel() != n_rows:
            raise ImageTokenMismatchError(
                f"the prompt has {image_positions.numel()} image positions (<image> tokens, id "
                f"{self.config.image_token_id}) but the images give {n_rows} features "
                f"({n_rows / self.config.image_seq_len:g} tiles x {self.config.image_seq_len}); each image tile "
                f"needs exactly {self.config.image_seq_len} <image> tokens, in order"
            )
        if n_rows:
            rows = image_features.reshape(n_rows, -1).to(embeds.dtype)  # (n_rows, hidden)
            flat = embeds.reshape(-1, embeds.shape[-1])  # (n_tokens, hidden)
            embeds = flat.index_copy(0, image_positions.to(flat.device), rows).view_as(embeds)
        return embeds

    def decode(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention: AttentionFn, ops: Ops = TORCH_OPS,
        *, checkpoint: bool = False,
    ) -> torch.Tensor:
        """The decoder stack: embeddings -> final-normed hidden states. `ops`: see ops.py.
        `checkpoint`: gradient checkpointing per decoder layer (training)."""
        return self.model.text_model(inputs_embeds, positions, attention, ops, checkpoint=checkpoint)

    def logits(self, hidden: torch.Tensor, ops: Ops = TORCH_OPS) -> torch.Tensor:
        return call_with_ops(self.lm_head, hidden, ops)

    # ------------------------------------------------------------------ the pipeline

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        ops: Ops = TORCH_OPS,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), no cache.

        `attention_mask` (B, T) marks real tokens of a left-padded batch; positions then count real
        tokens only (cumsum - 1), unless `position_ids` are given. `ops`: the few-row operations
        (ops.py); the default is the plain-PyTorch reference.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids should be (B, T), got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        features = None
        if pixel_values is not None:
            mask = None if pixel_attention_mask is None else pixel_attention_mask.to(self.device)
            features = self.image_features(pixel_values.to(self.device), mask)
        embeds = self.embed(input_ids, features)  # (B, T, D)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
            else:
                position_ids = (attention_mask.to(self.device).long().cumsum(-1) - 1).clamp(min=0)
        attention = CausalAttention(attention_mask, input_ids.shape[1], self.device)
        hidden = self.decode(embeds, position_ids.to(self.device), attention, ops)  # (B, T, D)
        return self.logits(hidden, ops)
