"""The engine end to end on the tiny checkpoint: greedy parity with transformers' `generate`, batching,
preemption, prefix caching, failures, sampling, stop strings, streaming.

The reference is transformers' model + `generate` (pinned 5.24.0) fed with our processor's tensors;
that the processor's tensors equal transformers' processor's is tested in test_processor.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from smolvlm.engine import Engine, PromptInputs, SamplingParams
from smolvlm.engine.detokenizer import IncrementalDetokenizer

from conversations import user

import transformers  # noqa: E402,F401  the parity reference (dev extra): missing must fail, not skip

NEW_TOKENS = 48


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(photos, tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-media")
    paths = {}
    for name in ("astronaut", "coffee", "chelsea", "small"):
        paths[name] = directory / f"{name}.png"
        photos[name].convert("RGB").save(paths[name])
    corrupt = directory / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    paths["corrupt"] = corrupt
    return paths


@pytest.fixture(scope="module")
def conversations(media, short_video):
    return {
        "text": user("Write a long story about a cat and a dog."),
        "image": user(("image", media["astronaut"]), "What is in this picture?"),
        "multi_image": user(("image", media["coffee"]), "Compare these two images.", ("image", media["chelsea"])),
        "video": user(("video", short_video), "What happens in this video?"),
        "small_image": user(("image", media["small"]), "Hi"),
    }


def make_engine(ckpt, **options):
    options.setdefault("attention_backend", "torch")
    options.setdefault("num_kv_blocks", 512)
    return Engine.from_pretrained(ckpt, **options)


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


def hf_generate(hf_model, engine, conversation, max_new_tokens=NEW_TOKENS, **kwargs):
    """transformers' greedy generate on the same tensors (one conversation, no padding)."""
    batch = engine.processor(conversation)
    with torch.inference_mode():
        out = hf_model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(engine.stop_token_ids),
            pad_token_id=2, **kwargs,
        )
    return out[0, batch["input_ids"].shape[1] :].tolist()


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at new token {i}: {x} vs {y} (lengths {len(a)}, {len(b)})"
    return f"lengths differ: {len(a)} vs {len(b)}"


def assert_pool_empty(engine):
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks, f"{manager.num_used_blocks} blocks still held"
    assert all(b.ref_count == 0 for b in manager.blocks)
    assert not engine.requests and not engine.has_unfinished()


# ---------------------------------------------------------------------------------------------
# Greedy parity with transformers
# ---------------------------------------------------------------------------------------------


def test_greedy_matches_transformers_text_images_video(tiny_ckpt, hf_model, conversations):
    engine = make_engine(tiny_ckpt)
    names = ["text", "image", "multi_image", "video"]
    results = engine.generate([conversations[n] for n in names], SamplingParams(max_new_tokens=NEW_TOKENS))
    for name, result in zip(names, results):
        assert result.error is None, f"{name}: {result.error}"
        expected = hf_generate(hf_model, engine, conversations[name])
        assert len(expected) == NEW_TOKENS, f"{name}: the reference stopped early, the test would prove less"
        assert result.token_ids == expected, f"{name}: {first_difference(result.token_ids, expected)}"
        assert result.text == engine.processor.decode(expected, skip_special_tokens=True)
    assert_pool_empty(engine)


def test_greedy_with_repetition_penalty_matches_transformers(tiny_ckpt, hf_model, conversations):
    engine = make_engine(tiny_ckpt)
    conv = conversations["image"]
    [result] = engine.generate([conv], SamplingParams(max_new_tokens=24, repetition_penalty=1.5))
    expected = hf_generate(hf_model, engine, conv, max_new_tokens=24, repetition_penalty=1.5)
    assert result.token_ids == expected, first_difference(result.token_ids, expected)


# ---------------------------------------------------------------------------------------------
# Batching, preemption, chunked prefill
# ---------------------------------------------------------------------------------------------


MIXED = ["text", "image", "multi_image", "video", "small_image", "text"]


@pytest.fixture(scope="module")
def alone(tiny_ckpt, conversations):
    """Each conversation generated alone, prefix cache off: the reference for the batched runs."""
    engine = make_engine(tiny_ckpt, enable_prefix_caching=False)
    params = SamplingParams(max_new_tokens=20)
    return {name: engine.generate([conversations[name]], params)[0].token_ids for name in set(MIXED)}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="roomy"),
        # 40 blocks of 16 tokens: the multi-image prompt alone takes 28, so sequences must be preempted
        # and recomputed; 128 tokens per step forces prompts to be prefilled in chunks.
        pytest.param({"num_kv_blocks": 40, "max_num_batched_tokens": 128}, id="preempting-chunked"),
    ],
)
def test_mixed_batch_equals_each_alone(tiny_ckpt, conversations, alone, options):
    engine = make_engine(tiny_ckpt, **options)
    # Prepared first, so all six are admitted at once (conversations with media would otherwise be
    # admitted as their media are decoded, while the others already run).
    prompts = [engine.prepare(conversations[n]) for n in MIXED]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=20))
    for name, result in zip(MIXED, results):
        assert result.error is None, f"{name}: {result.error}"
        assert result.token_ids == alone[name], f"{name}: {first_difference(result.token_ids, alone[name])}"
    if "num_kv_blocks" in options:
        assert engine.stats.preemptions > 0, "the pool was meant to be too small for the batch"
    assert_pool_empty(engine)


def test_requests_join_while_others_decode(tiny_ckpt, conversations, alone):
    engine = make_engine(tiny_ckpt)
    params = SamplingParams(max_new_tokens=20)
    first = engine.add_request(conversations["image"], params)
    for _ in range(5):
        engine.step()
    late = engine.add_request(conversations["text"], params)
    results = {}
    joined = False
    while engine.has_unfinished():
        running = {s.seq_id for s in engine.scheduler.running}
        joined |= {first, late} <= running
        for out in engine.step():
            if out.result is not None:
                results[out.request_id] = out.result
    assert joined, "the late request never ran alongside the first"
    assert results[first].token_ids == alone["image"]
    assert results[late].token_ids == alone["text"]
    assert_pool_empty(engine)


# ---------------------------------------------------------------------------------------------
# Prefix caching
# ---------------------------------------------------------------------------------------------


def test_second_question_about_a_video_hits_the_cache(tiny_ckpt, short_video):
    params = SamplingParams(max_new_tokens=12)
    video = ("video", short_video)
    first = user(video, "What happens in this video?")
    second = user(video, "What colour is the cup?")
    engine = make_engine(tiny_ckpt)
    start = time.perf_counter()
    [a] = engine.generate([first], params)
    first_time = time.perf_counter() - start
    prefill_before, vision_before = engine.stats.prefill_tokens, engine.stats.vision_calls
    start = time.perf_counter()
    [b] = engine.generate([second], params)
    second_time = time.perf_counter() - start
    second_prefill = engine.stats.prefill_tokens - prefill_before

    uncached = make_engine(tiny_ckpt, enable_prefix_caching=False)
    [expected] = uncached.generate([second], params)
    print(
        f"\nvideo prompt {b.num_prompt_tokens} tokens: first ask {first_time * 1e3:.0f} ms, second ask "
        f"{second_time * 1e3:.0f} ms, {b.num_cached_tokens} tokens from the cache, {second_prefill} prefilled"
    )
    assert b.token_ids == expected.token_ids, first_difference(b.token_ids, expected.token_ids)
    assert b.num_cached_tokens >= b.num_prompt_tokens - 32, "the video's blocks were not reused"
    assert second_prefill < b.num_prompt_tokens - b.num_cached_tokens + 1 + 16
    assert engine.stats.vision_calls == vision_before, "the video went through the vision tower again"
    assert_pool_empty(engine)


def test_fully_cached_prompt(tiny_ckpt, conversations):
    engine = make_engine(tiny_ckpt)
    params = SamplingParams(max_new_tokens=10)
    [a] = engine.generate([conversations["image"]], params)
    [b] = engine.generate([conversations["image"]], params)
    assert b.num_cached_tokens == (b.num_prompt_tokens - 1) // 16 * 16 > 0
    assert b.token_ids == a.token_ids
    assert_pool_empty(engine)


def test_two_images_with_identical_text_never_share_kv(tiny_ckpt, media):
    params = SamplingParams(max_new_tokens=16)
    cat = user(("image", media["chelsea"]), "Describe it.")
    coffee = user(("image", media["coffee"]), "Describe it.")
    engine = make_engine(tiny_ckpt)
    engine.generate([cat], params)
    [b] = engine.generate([coffee], params)
    [expected] = make_engine(tiny_ckpt, enable_prefix_caching=False).generate([coffee], params)
    assert b.token_ids == expected.token_ids, first_difference(b.token_ids, expected.token_ids)
    ids = engine.prepare(coffee).input_ids
    first_image_token = ids.index(engine.model.config.image_token_id)
    assert b.num_cached_tokens <= first_image_token, (
        f"{b.num_cached_tokens} tokens reused though the image starts at {first_image_token}"
    )


def test_cached_image_features_with_a_different_prefix(tiny_ckpt, media):
    """Same image, different text before it: no KV reuse past the text, but the features are reused."""
    params = SamplingParams(max_new_tokens=8)
    engine = make_engine(tiny_ckpt)
    engine.generate([user("First:", ("image", media["astronaut"]))], params)
    calls = engine.stats.vision_calls
    [b] = engine.generate([user("Second one:", ("image", media["astronaut"]))], params)
    assert engine.stats.vision_calls == calls
    cached = list(engine.runner.vision_cache.entries.values())
    assert cached and not any(f.requires_grad for f in cached), "cached features hold an autograd graph"
    [expected] = make_engine(tiny_ckpt).generate([user("Second one:", ("image", media["astronaut"]))], params)
    assert b.token_ids == expected.token_ids


def test_vision_tower_runs_in_bounded_passes(tiny_ckpt, media):
    """EngineConfig.vision_tiles_per_pass: the tower sees at most that many tiles per call, and the
    features (and so the answer) are those of one pass over all tiles."""
    from smolvlm import SmolVLM

    model = SmolVLM.from_pretrained(tiny_ckpt)
    pixels = torch.randn(1, 5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    size = model.config.vision.image_size
    pixels = torch.nn.functional.interpolate(pixels[0], size=(size, size))[None]  # (1, 5, 3, S, S)
    with torch.inference_mode():
        whole = model.image_features(pixels)
        for per_pass in (1, 2, 4, 5, 9):
            torch.testing.assert_close(model.image_features(pixels, tiles_per_pass=per_pass), whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="tiles_per_pass"):
        model.image_features(pixels, tiles_per_pass=0)

    params = SamplingParams(max_new_tokens=8)
    conversation = [user(("image", media["astronaut"]), "What is in this picture?")]  # split: several tiles
    sizes = []
    engine = make_engine(tiny_ckpt, vision_tiles_per_pass=2)
    original = engine.model.vision_features
    engine.model.vision_features = lambda tiles, *a, **k: (sizes.append(tiles.shape[0]), original(tiles, *a, **k))[1]
    [bounded] = engine.generate(conversation, params)
    assert len(sizes) > 1 and max(sizes) <= 2, sizes
    [unbounded] = make_engine(tiny_ckpt, vision_tiles_per_pass=1000).generate(conversation, params)
    assert bounded.token_ids == unbounded.token_ids
    assert make_engine(tiny_ckpt).runner.vision_tiles_per_pass == 1  # the CPU default
    with pytest.raises(ValueError, match="vision_tiles_per_pass"):
        make_engine(tiny_ckpt, vision_tiles_per_pass=0)


# ---------------------------------------------------------------------------------------------
# Failures stay with their request
# ---------------------------------------------------------------------------------------------


def test_failing_requests_fail_alone(tiny_ckpt, conversations, media, alone):
    engine = make_engine(tiny_ckpt, max_model_len=200)
    bad_image = user(("image", media["corrupt"]), "What is this?")
    too_long = conversations["multi_image"]  # 400+ tokens > 200
    missing = user(("image", media["corrupt"].with_name("does-not-exist.png")), "Hi")
    batch = [bad_image, conversations["text"], too_long, missing]
    results = engine.generate(batch, SamplingParams(max_new_tokens=20))
    assert results[1].error is None and results[1].token_ids == alone["text"]
    for i in (0, 2, 3):
        assert results[i].finish_reason == "error" and results[i].error, f"conversation {i} should have failed"
    assert "corrupt.png" in results[0].error
    assert "context" in results[2].error
    assert "does-not-exist.png" in results[3].error
    assert_pool_empty(engine)


def test_image_that_fails_in_the_vision_tower_fails_alone(tiny_ckpt, conversations, alone):
    engine = make_engine(tiny_ckpt)
    good = engine.prepare(conversations["image"])
    image_type = type(good.images[0])
    misshaped = PromptInputs(list(good.input_ids), [image_type(good.images[0].pixel_values[..., :7], "x")])
    marked = PromptInputs(list(good.input_ids), [image_type(torch.full_like(good.images[0].pixel_values, 1000.0), "m")])

    def tower_fails_on_marked_tiles(module, args):  # a plain PyTorch hook: the engine honours it
        if float(args[0].abs().max()) > 500:
            raise RuntimeError("the vision tower failed")

    handle = engine.model.model.vision_model.register_forward_pre_hook(tower_fails_on_marked_tiles)
    try:
        results = engine.generate([misshaped, marked, conversations["text"]], SamplingParams(max_new_tokens=20))
    finally:
        handle.remove()
    assert results[0].finish_reason == "error" and "pixel_values should be (n_tiles >= 1, 3, 64, 64)" in results[0].error
    assert results[1].finish_reason == "error" and "image features failed" in results[1].error, results[1]
    assert results[2].token_ids == alone["text"]
    assert_pool_empty(engine)


def test_prompt_larger_than_the_whole_pool_fails_alone(tiny_ckpt, conversations, alone):
    engine = make_engine(tiny_ckpt, num_kv_blocks=8)  # 128 tokens
    results = engine.generate([conversations["video"], conversations["text"]], SamplingParams(max_new_tokens=20))
    assert results[0].finish_reason == "error" and "KV-cache blocks" in results[0].error
    assert results[1].token_ids == alone["text"]
    assert_pool_empty(engine)


def test_generated_image_token_is_a_plain_token(tiny_ckpt, conversations):
    """A model may emit the `<image>` id itself; it has no features and must not break the step
    (transformers' generate embeds it as a plain token too)."""
    engine = make_engine(tiny_ckpt)
    real_sampler = engine.runner.sampler
    calls = []

    def sampler(logits, seq_ids, params, token_ids):
        tokens = real_sampler(logits, seq_ids, params, token_ids)
        calls.append(1)
        return [engine.model.config.image_token_id] * len(tokens) if len(calls) <= 2 else tokens

    engine.runner.sampler = sampler
    [result] = engine.generate([conversations["image"]], SamplingParams(max_new_tokens=6))
    assert result.error is None and result.token_ids[:2] == [engine.model.config.image_token_id] * 2 and len(result.token_ids) == 6
    assert_pool_empty(engine)


# ---------------------------------------------------------------------------------------------
# Sampling, stop strings, streaming, detokenisation
# ---------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_ckpt, conversations):
    engine = make_engine(tiny_ckpt)
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    [alone_result] = engine.generate([conversations["text"]], p)
    batch = engine.generate([conversations["image"], conversations["text"]], [SamplingParams(max_new_tokens=5), p])
    assert batch[1].token_ids == alone_result.token_ids
    other = engine.generate([conversations["text"]], SamplingParams(max_new_tokens=16, temperature=1.0, seed=8))[0]
    assert other.token_ids != alone_result.token_ids
    greedy = engine.generate([conversations["text"]], SamplingParams(max_new_tokens=16))[0]
    top1 = engine.generate([conversations["text"]], SamplingParams(max_new_tokens=16, temperature=0.7, top_k=1, seed=1))[0]
    assert top1.token_ids == greedy.token_ids, "top_k=1 must be greedy"


def test_sampler_filters_match_their_definitions():
    from smolvlm.engine.sampler import apply_repetition_penalty, apply_top_k, apply_top_p

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0), torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0]))
    top2 = apply_top_k(logits, 2)
    assert torch.isfinite(top2).tolist() == [True, False, False, True, False]
    probs = logits.softmax(-1)  # 3.0 -> 0.59, 2.0 -> 0.22, 1.0 -> 0.08
    kept = torch.isfinite(apply_top_p(logits, 0.7)).tolist()
    assert kept == [True, False, False, True, False], (kept, probs)
    assert torch.isfinite(apply_top_p(logits, 0.01)).tolist() == [False, False, False, True, False]


def test_stop_string_and_max_new_tokens(tiny_ckpt, conversations):
    engine = make_engine(tiny_ckpt)
    [full] = engine.generate([conversations["text"]], SamplingParams(max_new_tokens=30))
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = full.text[: full.text.index(stop)]
    [stopped] = engine.generate([conversations["text"]], SamplingParams(max_new_tokens=30, stop=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.text == cut
    assert len(stopped.token_ids) < 30
    pieces = list(engine.stream(conversations["text"], SamplingParams(max_new_tokens=30, stop=(stop,))))
    assert "".join(pieces) == cut
    # a stop token ends the answer right after its first occurrence, the token included
    token = full.token_ids[7]
    [by_token] = engine.generate([conversations["text"]], SamplingParams(max_new_tokens=30, stop_token_ids=(token,)))
    assert by_token.finish_reason == "stop"
    assert by_token.token_ids == full.token_ids[: full.token_ids.index(token) + 1]
    assert_pool_empty(engine)


def test_kv_cache_is_sized_from_the_memory_budget(tiny_ckpt):
    from smolvlm.engine.kv_cache import KVCache

    engine = make_engine(tiny_ckpt, num_kv_blocks=None, kv_cache_memory=1 << 20, block_size=8)
    text = engine.model.config.text
    per_block = 2 * text.num_hidden_layers * 8 * text.num_key_value_heads * text.head_dim * 4  # fp32
    assert KVCache.bytes_per_block(text, 8, torch.float32) == per_block
    assert engine.block_manager.num_blocks == (1 << 20) // per_block == engine.kv_cache.num_blocks
    assert engine.kv_cache.num_bytes <= 1 << 20
    k, v = engine.kv_cache.layer(1)
    assert k.shape == v.shape == (engine.kv_cache.num_blocks, 8, text.num_key_value_heads, text.head_dim)
    assert k.is_contiguous() and v.is_contiguous()


def test_stream_pieces_add_up_to_the_text(tiny_ckpt, conversations):
    engine = make_engine(tiny_ckpt)
    params = SamplingParams(max_new_tokens=24)
    pieces = list(engine.stream(conversations["image"], params))
    [result] = engine.generate([conversations["image"]], params)
    assert len(pieces) > 1 and "".join(pieces) == result.text
    assert 0 < result.time_to_first_token <= result.total_time
    # closing a stream early returns its blocks
    stream = engine.stream(conversations["video"], params)
    next(stream)
    stream.close()
    assert_pool_empty(engine)
    # so does a stream closed or dropped before its first piece: nothing stays queued
    stream = engine.stream(conversations["video"], params)
    assert engine.has_unfinished()
    stream.close()
    assert not engine.has_unfinished() and stream.request_id not in engine.requests
    engine.stream(conversations["text"], params)  # dropped at once
    assert not engine.has_unfinished()
    assert_pool_empty(engine)
    # the result comes with the stream
    stream = engine.stream(conversations["text"], params)
    text = "".join(stream)
    assert stream.result is not None and stream.result.text == text and 0 < len(stream.result.token_ids) <= 24


def test_incremental_detokenizer_never_splits_a_character(tiny_ckpt):
    from smolvlm.processing import Processor

    proc = Processor.from_pretrained(tiny_ckpt)
    text = "Café 🙂 naïve — 日本語 ok 🇫🇷!"
    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(lambda t: proc.decode(t, skip_special_tokens=True))
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 5  # it did stream, not hold everything back


# ---------------------------------------------------------------------------------------------
# The Triton backend (on CPU through TRITON_INTERPRET=1, set by conftest.py)
# ---------------------------------------------------------------------------------------------


def test_triton_backend_generates_the_same_tokens_as_torch(tiny_ckpt, conversations):
    import triton  # noqa: F401  a runtime dependency on Linux: missing must fail, not skip
    names = ["image", "video", "text"]
    params = SamplingParams(max_new_tokens=10)
    # 96 tokens per step: prompts are prefilled in chunks over their cached part, next to decodes
    # (mixed steps), so every kernel path runs: store_kv, paged prefill with context, paged decode.
    options = {"max_num_batched_tokens": 96, "num_kv_blocks": 128}
    expected = make_engine(tiny_ckpt, **options).generate([conversations[n] for n in names], params)
    engine = make_engine(tiny_ckpt, attention_backend="triton", **options)
    assert engine.backend.name == "triton"
    results = engine.generate([conversations[n] for n in names], params)
    for name, ours, reference in zip(names, results, expected):
        assert ours.error is None, f"{name}: {ours.error}"
        assert ours.token_ids == reference.token_ids, f"{name}: {first_difference(ours.token_ids, reference.token_ids)}"
    assert_pool_empty(engine)


def test_attention_backend_choice():
    from smolvlm.engine.attention import make_backend

    assert make_backend("auto", torch.device("cpu")).name == "torch"
    assert make_backend("torch", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="attention_backend must be"):
        make_backend("flash", torch.device("cpu"))


def test_vision_attention_choice():
    """The vision tower gets the Triton kernel only with the triton backend, on CUDA, for head sizes
    the kernel takes (checked on a GPU: features within 4e-6 of SDPA at the real shape, same tokens)."""
    from types import SimpleNamespace

    from smolvlm.engine.attention import TorchBackend, vision_attention_for

    kernel = object()
    triton = SimpleNamespace(name="triton", kernels=SimpleNamespace(masked_attention=kernel))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert vision_attention_for(triton, cuda, 64) is kernel
    assert vision_attention_for(triton, cuda, 8) is None  # the tiny checkpoint's vision heads
    assert vision_attention_for(triton, cpu, 64) is None  # the interpreter would only be slow
    assert vision_attention_for(TorchBackend(), cuda, 64) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with the device tool)")
def test_cuda_engine_graphs_and_backends_agree(tiny_ckpt, media):
    """On a GPU: decode steps replayed from CUDA graphs give the tokens of eager steps (fp32 and bf16),
    and the triton and torch backends agree in fp32 (in bf16 their different rounding may flip a
    near-tie of this random model); batches mix images, several images and text."""
    conversations = {
        "image": user(("image", media["astronaut"]), "What is in this picture?"),
        "text": user("Write a long story about a cat and a dog."),
        "multi_image": user(("image", media["coffee"]), "Compare these two images.", ("image", media["chelsea"])),
        "small_image": user(("image", media["small"]), "Hi"),
    }
    names = list(conversations)
    params = SamplingParams(max_new_tokens=24)
    for dtype in (torch.float32, torch.bfloat16):
        tokens = {}
        for label, options in {
            "triton+graphs": {"attention_backend": "triton", "cuda_graphs": True},
            "triton": {"attention_backend": "triton", "cuda_graphs": False},
            "torch": {"attention_backend": "torch"},
        }.items():
            engine = Engine.from_pretrained(tiny_ckpt, dtype=dtype, device="cuda", num_kv_blocks=256, max_num_seqs=8, **options)
            assert (engine.runner.graphs is not None) == (label == "triton+graphs")
            results = engine.generate([conversations[n] for n in names], params)
            assert all(r.error is None for r in results), [r.error for r in results]
            tokens[label] = [r.token_ids for r in results]
            assert_pool_empty(engine)
        for name, a, b, c in zip(names, tokens["triton+graphs"], tokens["triton"], tokens["torch"]):
            assert a == b, f"{dtype} {name}: graphs vs eager: {first_difference(a, b)}"
            if dtype == torch.float32:
                assert b == c, f"{dtype} {name}: triton vs torch: {first_difference(b, c)}"
