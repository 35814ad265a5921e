"""Hook points, capture and interventions (issue 12), checked against transformers.

- `run_with_cache`: decoder layer outputs = transformers' `hidden_states[i + 1]` (layers before the
  last), vision layer outputs = the vision tower's `hidden_states[i + 1]`, logits bit-identical to
  a plain call; on the tiny and the grafted (real-shape) checkpoints, text and images;
- attention probabilities: rows sum to 1 and equal transformers' eager `output_attentions`;
- interventions: patching a layer's residual stream with another prompt's gives that prompt's
  logits, a hook returning None changes nothing, ablating the connector changes the answer;
- the Engine refuses a model inside a `hooks` block.
"""

from __future__ import annotations

import pytest
import torch

from parity import assert_close
from smolvlm import SmolVLM
from smolvlm.engine import Engine, RequestError, SamplingParams
from smolvlm.processing import Processor
from smolvlm.vision import patch_mask_from_pixels

FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def models(request):
    """(ours, transformers sdpa, transformers eager, processor) per checkpoint kind, loaded once."""
    from transformers import SmolVLMForConditionalGeneration

    cache = {}

    def get(kind):
        if kind not in cache:
            cache.clear()  # one real-shape pair in memory at a time
            ckpt = request.getfixturevalue(f"{kind}_ckpt")
            load = lambda impl: SmolVLMForConditionalGeneration.from_pretrained(ckpt, attn_implementation=impl).eval()
            cache[kind] = (SmolVLM.from_pretrained(ckpt), load("sdpa"), load("eager"), Processor.from_pretrained(ckpt))
        return cache[kind]

    return get


def conversation(with_image):
    content = [{"type": "text", "text": "What is in this picture? Answer in one sentence."}]
    if with_image:
        content.insert(0, {"type": "image"})
    return [{"role": "user", "content": content}]


def inputs(processor, photos, with_image):
    messages = conversation(with_image)
    if with_image:
        messages[0]["content"][0]["image"] = photos["coffee"]
    return processor(messages, do_image_splitting=False)


CASES = [("tiny", False), ("tiny", True), ("grafted", False), ("grafted", True)]


@pytest.mark.parametrize("kind, with_image", CASES, ids=[f"{k}-{'image' if i else 'text'}" for k, i in CASES])
@torch.no_grad()
def test_run_with_cache_matches_transformers_layer_by_layer(models, photos, kind, with_image):
    ours, theirs, _, processor = models(kind)
    batch = inputs(processor, photos, with_image)
    pixels, mask = batch.get("pixel_values"), batch.get("pixel_attention_mask")
    logits, cache = ours.run_with_cache(batch["input_ids"], pixels, mask)
    assert torch.equal(logits, ours(batch["input_ids"], pixels, mask)), "capturing changed the logits"

    out = theirs(**batch, output_hidden_states=True)
    embeds = cache["model.text_model.inputs_embeds"]
    assert_close("inputs_embeds", embeds, out.hidden_states[0], FP32_ATOL)
    # The decoder from the same embeddings: transformers' full forward runs its own image path, whose
    # features differ from its vision tower called alone by a few ulp (ours equal the latter exactly,
    # below), and 30 layers of residual stream (|x| up to ~800) would carry that difference along.
    out = theirs(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
    layers = ours.config.text.num_hidden_layers
    for i in range(layers - 1):  # transformers' last entry has the final norm applied
        assert_close(f"text layer {i}", cache[f"model.text_model.layers.{i}"], out.hidden_states[i + 1], FP32_ATOL)
    assert_close("final norm", cache["model.text_model.norm"], out.hidden_states[-1], FP32_ATOL)
    assert_close("logits", logits, out.logits, FP32_ATOL)

    if with_image:
        tiles, pixel_mask = ours._real_tiles(pixels, mask)
        patch_mask = patch_mask_from_pixels(pixel_mask, ours.config.vision.patch_size)
        vision = theirs.model.vision_model(pixel_values=tiles, patch_attention_mask=patch_mask, output_hidden_states=True)
        for i in range(ours.config.vision.num_hidden_layers):
            name = f"model.vision_model.encoder.layers.{i}"
            assert_close(f"vision layer {i}", cache[name], vision.hidden_states[i + 1], FP32_ATOL)
        assert_close("vision tower", cache["model.vision_model"], vision.last_hidden_state, FP32_ATOL)
        connector = theirs.model.connector(vision.last_hidden_state)
        assert_close("connector", cache["model.connector"], connector, FP32_ATOL)


@pytest.mark.parametrize("kind", ["tiny", "grafted"])
@torch.no_grad()
def test_attention_probabilities_equal_transformers_eager(models, photos, kind):
    ours, _, eager, processor = models(kind)
    batch = inputs(processor, photos, True)
    names = lambda n: n.endswith(".self_attn.weights")
    logits, cache = ours.run_with_cache(batch["input_ids"], batch["pixel_values"], batch["pixel_attention_mask"], names=names)
    assert torch.equal(logits, ours(batch["input_ids"], batch["pixel_values"], batch["pixel_attention_mask"]))
    out = eager(**batch, output_attentions=True)
    for i, theirs in enumerate(out.attentions):
        probabilities = cache[f"model.text_model.layers.{i}.self_attn.weights"]  # (1, Hq, T, T)
        assert_close(f"text layer {i} row sums", probabilities.sum(-1), torch.ones_like(probabilities.sum(-1)), 1e-5)
        assert_close(f"text layer {i} attention", probabilities, theirs, 1e-5)  # eager layers feed eager ones
    tiles, pixel_mask = ours._real_tiles(batch["pixel_values"], batch["pixel_attention_mask"])
    patch_mask = patch_mask_from_pixels(pixel_mask, ours.config.vision.patch_size)
    vision = eager.model.vision_model(pixel_values=tiles, patch_attention_mask=patch_mask, output_attentions=True)
    for i, theirs in enumerate(vision.attentions):
        probabilities = cache[f"model.vision_model.encoder.layers.{i}.self_attn.weights"]  # (tiles, H, 1024, 1024)
        assert_close(f"vision layer {i} attention", probabilities, theirs, 1e-5)


@torch.no_grad()
def test_patching_a_layer_with_another_prompt_gives_its_logits(models):
    ours, *_ = models("tiny")
    a = torch.tensor([[1, 17, 230, 41, 5, 99, 7, 300]])
    b = torch.tensor([[1, 18, 40, 41, 512, 9, 70, 31]])  # same length
    logits_b, cache_b = ours.run_with_cache(b, names=[f"model.text_model.layers.{k}" for k in range(ours.config.text.num_hidden_layers)])
    for k in range(ours.config.text.num_hidden_layers):
        name = f"model.text_model.layers.{k}"
        with ours.hooks({name: lambda x, n: cache_b[n]}):
            patched = ours(a)
        assert_close(f"A patched at layer {k}", patched, logits_b, 1e-6)
    plain = ours(a)
    with ours.hooks({name: lambda x, n: None for name in ours.hook_names()}):  # look, change nothing
        assert torch.equal(ours(a), plain)


@torch.no_grad()
def test_ablations_and_knockouts(models, photos):
    ours, _, _, processor = models("grafted")
    batch = inputs(processor, photos, True)
    args = batch["input_ids"], batch["pixel_values"], batch["pixel_attention_mask"]
    plain = ours(*args)
    with ours.hooks({"model.connector": lambda x, n: torch.zeros_like(x)}):  # the image ablated
        ablated = ours(*args)
    answer = lambda logits: logits[0, -1].topk(5).indices.tolist()
    assert answer(ablated) != answer(plain), "zeroing the image features left the next-token ranking unchanged"

    # every head knocked out in layer 3 = that layer's attention output zeroed (o_proj has no bias)
    layer = "model.text_model.layers.3.self_attn"
    with ours.hooks({f"{layer}.weights": lambda p, n: torch.zeros_like(p)}):
        knocked = ours(*args)
    with ours.hooks({layer: lambda x, n: torch.zeros_like(x)}):
        zeroed = ours(*args)
    assert_close("all heads knocked out vs attention zeroed", knocked, zeroed, 1e-5)
    assert not torch.allclose(knocked, plain)
    # probabilities handed back unchanged (a copy): the eager product equals the fast kernel's output
    with ours.hooks({f"{layer}.weights": lambda p, n: p.clone()}):
        assert_close("eager attention through the hook", ours(*args), plain, 1e-4)


def test_bad_names_and_bad_replacements_are_named(models):
    ours, *_ = models("tiny")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(KeyError, match="did you mean model.text_model.layers.1.mlp"):
        with ours.hooks({"model.text_model.layer.1.mlp": lambda x, n: None}):
            pass
    with pytest.raises(ValueError, match="must return None or what it was given"):
        with ours.hooks({"model.text_model.layers.0": lambda x, n: x[:, :1]}):
            ours(ids)
    assert not any(m._forward_hooks for m in ours.modules()), "a failed block left hooks behind"
    _, cache = ours.run_with_cache(ids)
    with pytest.raises(KeyError, match="captured only when named"):
        cache["model.text_model.layers.0.self_attn.weights"]
    assert "model" not in ours.hook_names() and "model.text_model.layers" not in ours.hook_names()
    assert "model.text_model.inputs_embeds" in ours.hook_names() and "lm_head" in ours.hook_names()


def test_the_engine_refuses_a_hooked_model(tiny_ckpt):
    engine = Engine.from_pretrained(tiny_ckpt, attention_backend="torch", cpu_kernels="torch", num_kv_blocks=32)
    question = [{"role": "user", "content": "Hi"}]
    params = SamplingParams(max_new_tokens=3)
    before = engine.generate([question], params)[0].token_ids
    with engine.model.hooks({"model.text_model.layers.0": lambda x, n: None}):
        for call in (lambda: engine.generate([question], params), lambda: engine.stream(question, params),
                     lambda: engine.add_request(question, params)):
            with pytest.raises(RequestError, match="research hooks on model.text_model.layers.0"):
                call()
    handle = engine.model.model.text_model.layers[0].self_attn.weights.register_forward_hook(lambda m, a, o: None)
    try:
        with pytest.raises(RequestError, match="self_attn.weights"):
            engine.generate([question], params)
    finally:
        handle.remove()
    assert engine.generate([question], params)[0].token_ids == before
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
