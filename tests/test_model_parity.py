"""SmolVLM vs transformers, stage by stage: vision tower, connector, merged embeddings, decoder, logits.

Three checkpoints (tests/conftest.py): tiny random (every code path, real photos split into many
tiles), real 256M shape with random weights (the true names, shapes and head counts), and the real
SmolLM2-135M decoder grafted into the 256M layout (real language, so argmax agreement means
something). Inputs come from transformers' own processor so this file tests the model alone.
"""

from __future__ import annotations

import pytest
import torch

from parity import assert_close, assert_same_argmax
from smolvlm import SmolVLM
from smolvlm.text import CausalAttention
from smolvlm.vision import patch_mask_from_pixels

import transformers  # noqa: E402,F401  the parity reference (dev extra): missing must fail, not skip

# fp32: same operations in the same order as transformers; 1e-3 is the bound for logits, and
# the per-stage bounds are the same order (random-weight activations are O(1)-O(10)).
FP32_ATOL = 1e-3
# bf16: our large matmuls run as fp32 GEMMs rounded once to bf16 (smolvlm/linear.py: the same
# function as a bf16 GEMM up to summation order, and ~1.7x faster on this CPU), so we do not match
# transformers' bf16 bit for bit, and bit-level differences grow through 12 + 30 layers (on the
# grafted model with images, transformers' own bf16 logits are up to ~8 away from its fp32 logits).
# The meaningful bar is accuracy: against the fp32 model (which matches transformers' fp32 to 1e-3,
# tests above), our bf16 error may be no larger than transformers' bf16 error, in max and in mean,
# with a 25% margin for the luck of roundings. Prompts under 64 tokens keep the bf16 kernels and
# must match transformers' bf16 closely.
BF16_MARGIN = 1.25
BF16_TEXT_ATOL = 0.05


def assert_bf16_as_accurate(name: str, ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor) -> None:
    """ours/theirs: bf16 results; truth: the fp32 result. Our error must not exceed theirs (x margin)."""
    assert ours.shape == theirs.shape == truth.shape, f"{name}: shapes {ours.shape}, {theirs.shape}, {truth.shape}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values in ours"
    ours_err = (ours.float() - truth.float()).abs()
    their_err = (theirs.float() - truth.float()).abs()
    tiny = 1e-2 * float(truth.abs().mean())  # both errors ~0 (e.g. identical kernels): no ratio to take
    for stat, a, b in (("max", ours_err.max(), their_err.max()), ("mean", ours_err.mean(), their_err.mean())):
        assert float(a) <= BF16_MARGIN * float(b) + tiny, (
            f"{name}: our bf16 {stat} abs error vs fp32 is {float(a):.4g}, transformers' bf16 is {float(b):.4g} "
            f"(allowed {BF16_MARGIN} x theirs + {tiny:.2g}); our worst at {tuple(int(i) for i in torch.unravel_index(ours_err.argmax(), ours_err.shape))}"
        )


def _hf_model(ckpt, dtype):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def models(request):
    """(ours, theirs) per (checkpoint kind, dtype), loaded once per module."""
    cache: dict = {}

    def get(kind: str, dtype: torch.dtype):
        key = (kind, dtype)
        if key not in cache:
            if len(cache) >= 3:  # keep at most three model pairs in memory
                cache.pop(next(iter(cache)))
            ckpt = request.getfixturevalue(f"{kind}_ckpt")
            cache[key] = (SmolVLM.from_pretrained(ckpt, dtype=dtype), _hf_model(ckpt, dtype), ckpt)
        return cache[key]

    return get


def _batch(ckpt, photos, split: bool):
    """Two left-padded conversations: one image, and two images (so the image batch has a padding frame)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}],
        [{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image"},
            {"type": "text", "text": "with"},
            {"type": "image"},
            {"type": "text", "text": "in one sentence, please."},
        ]}],
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    images = [[photos["coffee"]], [photos["astronaut"], photos["chelsea"]]]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, do_image_splitting=split, padding=True, return_tensors="pt")
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def _compare_bf16_accuracy(ours, theirs, truth, batch):
    """bf16: each stage of ours and of transformers against our fp32 model (= transformers' fp32)."""
    valid = batch["attention_mask"].bool()
    pv, pam, ids = batch["pixel_values"], batch["pixel_attention_mask"], batch["input_ids"]
    with torch.no_grad():
        tiles, pixel_mask = truth._real_tiles(pv, pam)
        assert tiles.shape[0] < pv.shape[0] * pv.shape[1], "the batch should contain a padding frame"
        patch_mask = patch_mask_from_pixels(pixel_mask, truth.config.vision.patch_size)
        assert_bf16_as_accurate(
            "vision tower",
            ours.vision_features(tiles, patch_mask),
            theirs.model.vision_model(pixel_values=tiles.bfloat16(), patch_attention_mask=patch_mask).last_hidden_state,
            truth.vision_features(tiles, patch_mask),
        )
        assert_bf16_as_accurate(
            "image features",
            ours.image_features(pv, pam).flatten(0, 1),
            torch.cat(theirs.model.get_image_features(pv.bfloat16(), pam).pooler_output),
            truth.image_features(pv, pam).flatten(0, 1),
        )
        kwargs = dict(attention_mask=batch["attention_mask"])
        ref = theirs(input_ids=ids, position_ids=batch["position_ids"], pixel_values=pv.bfloat16(),
                     pixel_attention_mask=pam, **kwargs).logits
        assert_bf16_as_accurate("logits", ours(ids, pv, pam, **kwargs)[valid], ref[valid], truth(ids, pv, pam, **kwargs)[valid])


def _compare_stages(ours, theirs, batch, dtype, end_to_end=True, truth=None):
    """Each stage on the same input as the reference's; `end_to_end` also runs both full forwards
    (every vision tower run costs seconds at the real shape, so real-shape tests compose the stages).
    bf16 is judged by accuracy against the fp32 model instead (see BF16_MARGIN)."""
    if dtype == torch.bfloat16:
        return _compare_bf16_accuracy(ours, theirs, truth, batch)
    valid = batch["attention_mask"].bool()
    pv, pam = batch["pixel_values"], batch["pixel_attention_mask"]
    with torch.no_grad():
        # 1. vision tower, on the real (non-padding) tiles
        tiles, pixel_mask = ours._real_tiles(pv.to(dtype), pam)
        assert tiles.shape[0] < pv.shape[0] * pv.shape[1], "the batch should contain a padding frame"
        patch_mask = patch_mask_from_pixels(pixel_mask, ours.config.vision.patch_size)
        ref_vision = theirs.model.vision_model(pixel_values=tiles, patch_attention_mask=patch_mask).last_hidden_state
        got_vision = ours.vision_features(tiles, patch_mask)
        assert_close("vision tower", got_vision, ref_vision, FP32_ATOL)
        # 2. connector, fed the same input
        assert_close("connector", ours.model.connector(ref_vision), theirs.model.connector(ref_vision), FP32_ATOL)
        # 3. image features from the batch (padding-frame dropping, patch mask, tower, connector)
        ref_feat = torch.cat(theirs.model.get_image_features(pv.to(dtype), pam).pooler_output)  # (tiles*64, D)
        got_feat = ours.image_features(pv, pam)  # (tiles, 64, D)
        assert_close("image features", got_feat.reshape(ref_feat.shape), ref_feat, FP32_ATOL)
        # 4. merge: transformers' placeholder mask + masked_scatter of its own features
        ids = batch["input_ids"]
        ref_embeds = theirs.model.get_input_embeddings()(ids)
        ref_embeds = ref_embeds.masked_scatter(theirs.model.get_placeholder_mask(ids, ref_embeds, ref_feat), ref_feat)
        got_embeds = ours.embed(ids, got_feat)
        assert_close("merged embeddings", got_embeds[valid], ref_embeds[valid], FP32_ATOL)
        # 5. decoder and LM head, both fed transformers' merged embeddings
        ref_hidden = theirs.model.text_model(inputs_embeds=ref_embeds, attention_mask=batch["attention_mask"],
                                             position_ids=batch["position_ids"]).last_hidden_state
        attention = CausalAttention(batch["attention_mask"], ids.shape[1], ours.device)
        got_hidden = ours.decode(ref_embeds, batch["position_ids"], attention)
        assert_close("decoder hidden states", got_hidden[valid], ref_hidden[valid], FP32_ATOL)
        ref_logits = theirs.lm_head(ref_hidden)
        assert_close("logits (stages)", ours.logits(got_hidden)[valid], ref_logits[valid], FP32_ATOL)
        if end_to_end:
            # 6. the public forward against transformers' forward, inputs as the processor gave them
            ref_logits = theirs(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                                pixel_values=pv.to(dtype), pixel_attention_mask=pam).logits
            got_logits = ours(ids, pv, pam, attention_mask=batch["attention_mask"])
            assert_close("logits (forward)", got_logits[valid], ref_logits[valid], FP32_ATOL)
        else:
            got_logits = ours.logits(ours.decode(got_embeds, batch["position_ids"], attention))
            assert_close("logits (our stages end to end)", got_logits[valid], ref_logits[valid], FP32_ATOL)
        assert_same_argmax("logits", got_logits[valid], ref_logits[valid])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_split_photos(models, photos, dtype):
    """Real photos split into tiles (up to 4x4 + global per image) in a left-padded batch of two."""
    ours, theirs, ckpt = models("tiny", dtype)
    truth = models("tiny", torch.float32)[0]
    batch = _batch(ckpt, photos, split=True)
    assert batch["pixel_values"].shape[1] > 5, "photos should be split into several tiles"
    _compare_stages(ours, theirs, batch, dtype, truth=truth)


def _pad_inside_tiles(batch, tile_size):
    """Make tiles partly padding, as a processor that keeps aspect ratio (or do_resize=False) would:
    the first tile keeps its top-left 60% x 75%, the second its left half. transformers' own
    processor always fills 512^2 tiles, so this is the only way to exercise bucketised position ids
    and the key-padding mask."""
    pv, pam = batch["pixel_values"].clone(), batch["pixel_attention_mask"].clone()
    h, w = int(tile_size * 0.6), int(tile_size * 0.75)
    pam[0, 0, h:, :] = 0
    pam[0, 0, :, w:] = 0
    pam[1, 0, :, tile_size // 2:] = 0
    pv *= pam[:, :, None].to(pv.dtype)
    batch["pixel_values"], batch["pixel_attention_mask"] = pv, pam
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_partial_tiles(models, photos, dtype):
    """Tiles that are partly padding: bucketised position ids and the vision key-padding mask."""
    ours, theirs, ckpt = models("tiny", dtype)
    truth = models("tiny", torch.float32)[0]
    batch = _pad_inside_tiles(_batch(ckpt, photos, split=False), ours.config.vision.image_size)
    _compare_stages(ours, theirs, batch, dtype, truth=truth)


# bf16 on the grafted checkpoint only: "real" has the same shapes with random weights everywhere, so
# its bf16 run (200 s of transformers' bf16 on CPU) would check the same arithmetic a second time.
@pytest.mark.parametrize(
    "kind,dtype", [("real", torch.float32), ("grafted", torch.float32), ("grafted", torch.bfloat16)],
    ids=["fp32-real", "fp32-grafted", "bf16-grafted"],
)
def test_real_shape_images(models, photos, kind, dtype):
    ours, theirs, ckpt = models(kind, dtype)
    truth = models(kind, torch.float32)[0] if dtype == torch.bfloat16 else None
    # 3 tiles of 512^2 + a padding frame keeps CI time sane; two tiles partly padded inside.
    batch = _pad_inside_tiles(_batch(ckpt, photos, split=False), ours.config.vision.image_size)
    _compare_stages(ours, theirs, batch, dtype, end_to_end=False, truth=truth)


def _chat_ids(ckpt, questions):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in questions]
    return processor.tokenizer(texts, padding=True, return_tensors="pt")


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grafted_text_argmax_every_position(models, dtype):
    """Real decoder weights: the next-token argmax agrees with transformers at every real position."""
    ours, theirs, ckpt = models("grafted", dtype)
    batch = _chat_ids(ckpt, PROMPTS)
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = theirs(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids).logits
        got = ours(batch["input_ids"], attention_mask=mask)
    valid = mask.bool()
    if dtype == torch.float32:
        assert_close("grafted text logits", got[valid], ref[valid], FP32_ATOL)
        assert_same_argmax("grafted text logits", got[valid], ref[valid])
    else:
        # short prompts (< 64 tokens) keep the bf16 kernels: close to transformers' bf16 itself
        assert_close("grafted text logits bf16", got[valid], ref[valid], BF16_TEXT_ATOL)
        # Near-ties may flip in bf16; where the argmax differs, the two top logits must be within tolerance.
        a, b = got[valid].argmax(-1), ref[valid].argmax(-1)
        for i in (a != b).nonzero().flatten().tolist():
            gap = float(ref[valid][i, b[i]] - ref[valid][i, a[i]])
            assert gap <= BF16_TEXT_ATOL, f"bf16 argmax flip at {i} with reference gap {gap}"
        assert (a == b).float().mean() > 0.95


def test_grafted_answers_sensibly(models):
    """The grafted decoder is a real language model: greedy continuation names Paris."""
    ours, _, ckpt = models("grafted", torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = _chat_ids(ckpt, ["What is the capital of France?"])["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, ours(ids)[:, -1:].argmax(-1)], dim=1)
    assert "Paris" in tok.decode(ids[0, -8:]), tok.decode(ids[0, -8:])


def test_padding_invariance(models):
    """A left-padded row gives the same logits as the same prompt alone."""
    ours, _, ckpt = models("tiny", torch.float32)
    batch = _chat_ids(ckpt, ["Hi", "A much longer question about many different things?"])
    alone = _chat_ids(ckpt, ["Hi"])
    with torch.no_grad():
        padded = ours(batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        single = ours(alone["input_ids"])[0]
    n = single.shape[0]
    assert_close("left-padded row vs alone", padded[-n:], single, 1e-4)
