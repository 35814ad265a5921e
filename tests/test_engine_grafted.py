"""Greedy generation on the real-shape checkpoint with SmolLM2-135M-Instruct's decoder weights: real
answers, so token-for-token agreement over long outputs is meaningful (random weights cannot give that).
Reference: transformers' `generate` (pinned 5.24.0), float32, same prompts.
"""

from __future__ import annotations

import pytest
import torch

from smolvlm.engine import Engine, SamplingParams

import transformers  # noqa: E402,F401  the parity reference (dev extra): missing must fail, not skip

QUESTIONS = [  # two that give long answers (64 tokens, no early stop), one short with a known answer
    "Explain how photosynthesis works.",
    "Explain in detail how a bicycle works, part by part.",
    "What is the capital of France?",
]
NEW_TOKENS = 56


@pytest.mark.slow
def test_grafted_text_greedy_matches_transformers(grafted_ckpt):
    from transformers import SmolVLMForConditionalGeneration

    engine = Engine.from_pretrained(grafted_ckpt, attention_backend="torch", kv_cache_memory=256 << 20)
    conversations = [[{"role": "user", "content": [{"type": "text", "text": q}]}] for q in QUESTIONS]
    results = engine.generate(conversations, SamplingParams(max_new_tokens=NEW_TOKENS))  # one batched call

    hf = SmolVLMForConditionalGeneration.from_pretrained(grafted_ckpt, dtype=torch.float32).eval()
    long_answers = 0
    for question, conversation, result in zip(QUESTIONS, conversations, results):
        batch = engine.processor(conversation)
        with torch.inference_mode():
            out = hf.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = out[0, batch["input_ids"].shape[1] :].tolist()
        ours = result.token_ids
        where = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
        assert ours == expected, (
            f"{question!r}: first difference at new token {where}: ours {ours[where:where + 5]} vs "
            f"transformers {expected[where:where + 5]}\nours: {result.text!r}\n"
            f"transformers: {engine.processor.decode(expected, skip_special_tokens=True)!r}"
        )
        long_answers += len(expected) >= 48
    assert long_answers >= 2, "the long prompts should give at least 48 new tokens each"
    assert "Paris" in results[2].text, results[2].text
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
