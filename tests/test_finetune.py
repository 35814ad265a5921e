"""Fine-tuning (smolvlm/train): the loss and its gradients against transformers + PEFT, adapters both
ways between PEFT and us, merging, resume, data-parallel processes, bad data, and the CLI.

Gradient tolerances, from the arithmetic:
- fp64 (tiny checkpoint): ours and transformers + PEFT compute the same function, so every gradient
  agrees to ~1e-15 relative; the bound is 1e-10. This is where a wrong mask or label would show.
- fp32: two implementations differ by rounding. The issue's bound, 1e-5 relative, holds for each
  tensor on the tiny checkpoint and for the whole gradient (all tensors as one vector) on the
  grafted one. Per tensor on the grafted checkpoint (30 layers; norm weights sum over every token)
  the bound is 3e-5: transformers' own fp32 gradients are up to 9.6e-6 per tensor away from its
  fp64 ones there (measured on the video batch below), so two correct fp32 implementations can be
  twice that apart; we measured up to 1.2e-5.
- SigLIP's key-projection biases get a gradient that is zero in exact arithmetic (softmax ignores a
  constant added to a whole row of logits, and q . b_k is one), so for them both sides' rounding
  noise (~1e-8) is compared with the size of a real gradient instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from smolvlm.model import SmolVLM
from smolvlm.processing import Processor
from smolvlm.train.data import IGNORE, DataError, collate, read_examples
from smolvlm.train.lora import (AdapterError, LoraConfig, add_lora, decoder_targets, load_adapter, lora_modules,
                                merge_lora, save_adapter)
from smolvlm.train.loss import LanguageModelLoss
from smolvlm.train.train import FinetuneConfig, finetune, step_examples

from parity import assert_close

GRAD_RTOL = 1e-5


def user(*items):
    return {"role": "user", "content": list(items)}


def answer(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def image(path):
    return {"type": "image", "path": str(path)}


def text(t):
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> dict[str, Path]:
    """Solid-colour PNGs of a few sizes."""
    folder = tmp_path_factory.mktemp("squares")
    out = {}
    for name, rgb, size in (("red", (220, 20, 20), (40, 30)), ("green", (20, 170, 40), (700, 300)),
                            ("blue", (30, 40, 220), (64, 64))):
        out[name] = folder / f"{name}.png"
        Image.new("RGB", size, rgb).save(out[name])
    return out


def hf_peft(ckpt: Path, ours: SmolVLM, target_modules):
    """transformers' model + a PEFT LoRA with `ours`' weights (every parameter trainable)."""
    import peft
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0))
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            p.copy_(params[name.removeprefix("base_model.model.").replace(".default", "")])
            p.requires_grad_(True)
    return wrapped


def ours_with_lora(ckpt: Path) -> SmolVLM:
    torch.manual_seed(0)
    model = SmolVLM.from_pretrained(ckpt)
    add_lora(model, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for m in lora_modules(model).values():  # B = 0 would make A's gradient zero
            m.lora_B.weight.normal_(std=0.02)
    model.requires_grad_(True)  # LoRA and full fine-tuning gradients in one backward
    return model


def compare_gradients(ours: SmolVLM, reference, batch, per_tensor: float, total: float = GRAD_RTOL) -> None:
    dtype = ours.dtype
    if batch.pixel_values is not None:
        batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.to(dtype))
    loss = LanguageModelLoss(ours)(batch) / batch.num_labels
    loss.backward()
    out = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                    pixel_attention_mask=batch.pixel_attention_mask, labels=batch.labels)
    out.loss.backward()
    assert abs(loss.item() - out.loss.item()) <= total * abs(out.loss.item()), (loss.item(), out.loss.item())
    params = dict(ours.named_parameters())
    checked, failures, diff2, ref2 = 0, [], 0.0, 0.0
    key_bias_floor = max(float(p.grad.norm()) for n, p in reference.named_parameters() if n.endswith("v_proj.bias"))
    for name, ref in reference.named_parameters():
        mine = params[name.removeprefix("base_model.model.").replace(".default", "")]
        assert mine.grad is not None and ref.grad is not None, f"{name}: a gradient is missing"
        if "vision_model" in name and name.endswith("self_attn.k_proj.bias"):
            for g in (mine.grad, ref.grad):  # zero in exact arithmetic: both sides' noise far below a real gradient
                assert float(g.norm()) <= 1e-5 * key_bias_floor, f"{name}: |grad| {float(g.norm()):.3g}"
            continue
        difference = float((mine.grad - ref.grad).norm())
        diff2, ref2 = diff2 + difference**2, ref2 + float(ref.grad.norm()) ** 2
        rel = difference / float(ref.grad.norm())
        checked += 1
        if not rel <= per_tensor:
            failures.append(f"{name}: relative difference {rel:.3g}, max abs {float((mine.grad - ref.grad).abs().max()):.3g}")
    assert not failures, f"{len(failures)} of {checked} gradients differ by more than {per_tensor:g}:\n  " + "\n  ".join(failures[:10])
    assert (diff2 / ref2) ** 0.5 <= total, f"the whole gradient differs by {(diff2 / ref2) ** 0.5:.3g} relative"
    assert checked > 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("media", ["images", "video"])
def test_loss_and_every_gradient_match_transformers_peft_tiny(tiny_ckpt, squares, short_video, media, dtype):
    processor = Processor.from_pretrained(tiny_ckpt)
    if media == "images":  # two rows of different lengths and tile counts (split 700x300 vs one tile)
        conversations = [[user(image(squares["red"]), text("What colour?")), answer("Red.")],
                         [user(image(squares["green"]), text("And this?")), answer("Green, I think."),
                          user(text("Sure?")), answer("Yes.")]]
    else:
        conversations = [[user({"type": "video", "path": str(short_video)}, text("What happens?")),
                          answer("A cup of coffee slides to the right.")]]
    batch = collate(processor, [processor.prepare_labelled(c) for c in conversations], ["a", "b"][: len(conversations)])
    ours = ours_with_lora(tiny_ckpt)
    reference = hf_peft(tiny_ckpt, ours, decoder_targets())
    bound = GRAD_RTOL if dtype == torch.float32 else 1e-10
    compare_gradients(ours.to(dtype), reference.to(dtype), batch, per_tensor=bound, total=bound)


def test_lora_alone_with_the_frozen_tower_matches_transformers_peft(tiny_ckpt, squares):
    """The training default: only the adapters need gradients, so image features come from the frozen
    tower without autograd, one media item and (on CPU) one tile at a time, through the cache."""
    from smolvlm.engine.runner import VisionFeatureCache

    processor = Processor.from_pretrained(tiny_ckpt)
    conversations = [[user(image(squares["green"]), image(squares["red"]), text("Colours?")), answer("Green, red.")],
                     [user(image(squares["blue"]), text("And this?")), answer("Blue.")]]
    batch = collate(processor, [processor.prepare_labelled(c) for c in conversations], ["a", "b"])
    ours = ours_with_lora(tiny_ckpt)
    reference = hf_peft(tiny_ckpt, ours, decoder_targets())
    for model in (ours, reference):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    objective = LanguageModelLoss(ours, feature_cache=VisionFeatureCache(2**26))
    for attempt in range(2):  # the second time the features come from the cache
        ours.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        loss = objective(batch) / batch.num_labels
        loss.backward()
        out = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                        pixel_attention_mask=batch.pixel_attention_mask, labels=batch.labels)
        out.loss.backward()
        assert abs(loss.item() - out.loss.item()) <= GRAD_RTOL * out.loss.item()
        params = dict(ours.named_parameters())
        for name, ref in reference.named_parameters():
            if ref.requires_grad:
                mine = params[name.removeprefix("base_model.model.").replace(".default", "")].grad
                assert float((mine - ref.grad).norm() / ref.grad.norm()) <= GRAD_RTOL, name
    assert objective.cache_hits == 3 and objective.cache_misses == 3


@pytest.mark.slow
def test_loss_and_every_gradient_match_transformers_peft_grafted(grafted_ckpt, squares, short_video):
    """The 256M shape (real SmolLM2-135M decoder): 30 layers for rounding to build up in."""
    processor = Processor.from_pretrained(grafted_ckpt)
    ours = ours_with_lora(grafted_ckpt)
    reference = hf_peft(grafted_ckpt, ours, decoder_targets())
    image_batch = [[user(image(squares["red"]), text("What colour?")), answer("Red.")],
                   [user(image(squares["blue"]), text("And this one?")), answer("It is blue, I think.")]]
    video_batch = [[user({"type": "video", "path": str(short_video)}, text("What happens?")), answer("Coffee.")]]
    for conversations, options in ((image_batch, {"do_image_splitting": False}), (video_batch, {"video_max_frames": 2})):
        batch = collate(processor, [processor.prepare_labelled(c, **options) for c in conversations],
                        [str(i) for i in range(len(conversations))])
        ours.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        compare_gradients(ours, reference, batch, per_tensor=3e-5)


def test_labels_are_the_assistant_turns_through_their_end_of_utterance(tiny_ckpt, squares):
    processor = Processor.from_pretrained(tiny_ckpt)
    conversation = [{"role": "system", "content": "Be brief."}, user(image(squares["red"]), text("Colour?")),
                    answer("Red."), user(text("Sure?")), answer("Yes")]
    labelled = processor.prepare_labelled(conversation)
    ids = labelled.item.input_ids
    assert len(labelled.labels) == len(ids)
    kept = [t for t, label in zip(ids, labelled.labels) if label != IGNORE]
    assert processor.decode(kept) == " Red.<end_of_utterance> Yes<end_of_utterance>"
    assert all(label in (IGNORE, t) for t, label in zip(ids, labelled.labels))
    image_id = processor.image_token_id
    assert all(label != image_id for label in labelled.labels) and ids.count(image_id) > 0
    # the same tokens as inference sees: the prompt for the first answer is a prefix
    prompt = processor.prepare(conversation[:2], add_generation_prompt=True).input_ids
    assert ids[: len(prompt)] == prompt and labelled.labels[len(prompt)] == ids[len(prompt)]
    assert all(label == IGNORE for label in labelled.labels[: len(prompt)])


def test_adapter_files_load_in_peft_with_the_same_logits_and_back(tiny_ckpt, squares, tmp_path):
    import peft
    from transformers import AutoModelForImageTextToText

    processor = Processor.from_pretrained(tiny_ckpt)
    inputs = processor([user(image(squares["green"]), text("What colour?"))])
    ours = ours_with_lora(tiny_ckpt)
    save_adapter(ours, tmp_path / "ours", LoraConfig(r=4, lora_alpha=8), base_model=str(tiny_ckpt))
    hf = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        mine = ours(**inputs)
        theirs = loaded(**inputs).logits
    assert_close("logits, our adapter in PEFT", mine, theirs, atol=1e-4)

    # PEFT's own adapter, with a list of names (which PEFT matches in the vision tower too) and rsLoRA
    hf2 = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, dtype=torch.float32)
    theirs_model = peft.get_peft_model(hf2, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "fc2"],
                                                            use_rslora=True))
    with torch.no_grad():
        for n, p in theirs_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    theirs_model.save_pretrained(tmp_path / "peft")
    fresh = SmolVLM.from_pretrained(tiny_ckpt)
    config = load_adapter(fresh, tmp_path / "peft")
    assert config.use_rslora and any("vision_model" in n for n in lora_modules(fresh))
    with torch.no_grad():
        assert_close("logits, PEFT's adapter here", fresh(**inputs), theirs_model.eval()(**inputs).logits, atol=1e-4)
        unmerged = fresh(**inputs)
        wrapped = len(lora_modules(fresh))
        assert wrapped == 2 * 2 + 2 * 2 + 2  # q/v in 2 decoder and 2 vision layers, fc2 in 2 vision layers
        assert merge_lora(fresh) == wrapped and not lora_modules(fresh)
        assert_close("logits, merged vs adapter", fresh(**inputs), unmerged, atol=1e-4)


def test_bad_adapters_are_refused_by_name_and_leave_the_model_alone(tiny_ckpt, tmp_path):
    model = SmolVLM.from_pretrained(tiny_ckpt)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    good = ours_with_lora(tiny_ckpt)
    save_adapter(good, tmp_path / "a", LoraConfig(r=4, lora_alpha=8), base_model="x")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for change, message in (({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "only LORA"), ({"r": 3}, "does not fit"),
                            ({"init_lora_weights": "pissa"}, "also changes the base weights"),
                            ({"use_magic": 2}, "does not know")):
        bad = tmp_path / f"bad{len(message)}"
        shutil.copytree(tmp_path / "a", bad)
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=message):
            load_adapter(model, bad)
        assert not lora_modules(model)
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(model, tmp_path / "a")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def colour_rows(squares, names=("red", "green", "blue")):
    return [{"messages": [user({"type": "image", "path": squares[n].name}, text("What colour is this?")), answer(n)]}
            for n in names]


def test_bad_lines_are_named_and_can_be_skipped(tiny_ckpt, squares, tmp_path):
    processor = Processor.from_pretrained(tiny_ckpt)
    folder = squares["red"].parent
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    many = [{"type": "image", "path": "red.png"}] * 200  # 200 images x 64+ tokens: over the 8192 context
    rows = colour_rows(squares, ["red"]) + [
        "{not json",
        {"messages": [user(text("hi"))]},  # no assistant turn
        {"messages": [user({"type": "image", "path": "missing.png"}, text("?")), answer("x")]},
        {"messages": [user({"type": "image", "path": "broken.png"}, text("?")), answer("x")]},
        {"messages": [user(*many, text("?")), answer("x")]},
        {"conversation": []},
    ]
    data = write_jsonl(folder / "mixed.jsonl", rows)
    expected = ["mixed.jsonl:2: not valid JSON", "mixed.jsonl:3: no assistant turn", "mixed.jsonl:4: ",
                "mixed.jsonl:5: ", "mixed.jsonl:6: ", "mixed.jsonl:7: expected an object with a 'messages' list"]
    with pytest.raises(DataError, match="mixed.jsonl:2: not valid JSON"):
        read_examples(data, processor, {}, progress=False)
    examples, skipped = read_examples(data, processor, {}, skip_bad=True, progress=False)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1"]
    assert len(skipped) == 6 and all(want in got for want, got in zip(expected, skipped)), skipped
    assert "missing.png" in skipped[2] and "broken.png" in skipped[3] and "context" in skipped[4]


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_ckpt, squares, tmp_path):
    data = write_jsonl(squares["red"].parent / "colours.jsonl", colour_rows(squares) * 2)
    common = dict(model=str(tiny_ckpt), data=str(data), eval_data=str(data), eval_every=2, steps=6, batch_size=1,
                  grad_accum=2, lr=1e-3, lora_dropout=0.2, do_image_splitting=False, progress=False)
    whole = finetune(FinetuneConfig(output=str(tmp_path / "whole"), **common))
    first = finetune(FinetuneConfig(output=str(tmp_path / "parts"), save_every=3, **common))
    assert first.losses == whole.losses  # checkpointing does not disturb the run
    (tmp_path / "parts" / "checkpoint-6").rename(tmp_path / "later")  # resume from step 3, not the end
    with pytest.raises(ValueError, match="belongs to a run of 6 steps; this one would be 7"):
        finetune(FinetuneConfig(output=str(tmp_path / "parts"), resume="latest", **{**common, "steps": 7}))
    resumed = finetune(FinetuneConfig(output=str(tmp_path / "parts"), resume="latest", **common))
    assert resumed.losses == whole.losses and resumed.eval_losses == whole.eval_losses
    assert [s for s, _ in whole.eval_losses] == [2, 4, 6]
    logged = [json.loads(line)["loss"] for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == whole.losses and len(set(whole.losses)) == 6
    from safetensors.torch import load_file
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "parts" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="already holds a fine-tuning run"):  # nothing is overwritten
        finetune(FinetuneConfig(output=str(tmp_path / "whole"), **common))
    with pytest.raises(ValueError, match="different settings: lr"):
        finetune(FinetuneConfig(output=str(tmp_path / "parts"), resume="latest", **{**common, "lr": 2e-3}))


def test_the_stream_of_examples_is_a_shuffle_per_epoch():
    items = list(range(5))
    stream = [x for step in range(5) for x in step_examples(items, step, 2, seed=3)]
    assert sorted(stream[:5]) == items and sorted(stream[5:10]) == items and stream[:5] != stream[5:10]


def test_gradient_checkpointing_and_accumulation_give_the_same_gradients(tiny_ckpt, squares):
    processor = Processor.from_pretrained(tiny_ckpt)
    conversations = [[user(image(squares[n]), text("Colour?")), answer(n * (i + 1))] for i, n in enumerate(["red", "blue"])]
    labelled = [processor.prepare_labelled(c) for c in conversations]
    whole = collate(processor, labelled, ["a", "b"])
    model = ours_with_lora(tiny_ckpt)

    def grads(batches, checkpoint):
        model.zero_grad(set_to_none=True)
        total = sum(b.num_labels for b in batches)
        for b in batches:
            (LanguageModelLoss(model, checkpoint=checkpoint)(b) / total).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads([whole], False)
    checkpointed = grads([whole], True)  # the same operations, recomputed: the same numbers
    assert all(torch.equal(checkpointed[n], plain[n]) for n in plain)
    accumulated = grads([collate(processor, [c], ["x"]) for c in labelled], False)  # sums in another order
    worst = max(float((accumulated[n] - plain[n]).norm() / plain[n].norm()) for n in plain if "k_proj.bias" not in n)
    assert worst <= GRAD_RTOL, worst


def test_full_fine_tune_writes_a_checkpoint_both_projects_load(tiny_ckpt, squares, tmp_path):
    from transformers import AutoModelForImageTextToText

    data = write_jsonl(squares["red"].parent / "full.jsonl", colour_rows(squares))
    result = finetune(FinetuneConfig(model=str(tiny_ckpt), data=str(data), output=str(tmp_path / "full"), steps=2,
                                     lora_rank=0, train=("connector", "decoder"), lr=1e-3, progress=False))
    assert result.kind == "checkpoint"
    processor = Processor.from_pretrained(tmp_path / "full")
    inputs = processor([user(image(squares["blue"]), text("Colour?"))])
    tuned, base = SmolVLM.from_pretrained(tmp_path / "full"), SmolVLM.from_pretrained(tiny_ckpt)
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "full", dtype=torch.float32)
    with torch.no_grad():
        mine = tuned(**inputs)
        assert_close("full fine-tune, transformers", mine, hf(**inputs).logits, atol=1e-4)
        assert float((mine - base(**inputs)).abs().max()) > 1e-3  # it did train
        # the vision tower was frozen: bit for bit the base's
        for (n, a), (_, b) in zip(tuned.model.vision_model.named_parameters(), base.model.vision_model.named_parameters()):
            assert torch.equal(a, b), n


def test_merge_cli_and_engine_adapter_give_the_adapters_logits(tiny_ckpt, squares, tmp_path):
    from smolvlm.cli import main
    from smolvlm.engine import Engine, SamplingParams
    from smolvlm.research import generate
    from smolvlm.text import fused_weight

    ours = ours_with_lora(tiny_ckpt).eval()
    save_adapter(ours, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8), base_model=str(tiny_ckpt))
    assert main(["merge", "--model", str(tiny_ckpt), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 0
    processor = Processor.from_pretrained(tiny_ckpt)
    conversation = [user(image(squares["red"]), text("What colour?"))]
    inputs = processor(conversation)
    merged = SmolVLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert_close("merged checkpoint vs model + adapter", merged(**inputs), ours(**inputs), atol=1e-4)
    engine = Engine.from_pretrained(tiny_ckpt, adapter=tmp_path / "adapter")
    assert not lora_modules(engine.model)
    attn = engine.model.model.text_model.layers[0].self_attn
    with torch.no_grad():  # merged weights laid out back to back again: the fused decode product applies
        assert fused_weight(torch.zeros(1, attn.q_proj.in_features), attn.q_proj, attn.k_proj, attn.v_proj) is not None
    got = engine.generate([conversation], SamplingParams(max_new_tokens=6))[0].token_ids
    want = generate(ours, processor, conversation, max_new_tokens=6)
    assert list(got)[: len(want.token_ids)] == list(want.token_ids) and len(got) - len(want.token_ids) in (0, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_the_doubled_batch(tiny_ckpt, squares, tmp_path):
    data = write_jsonl(squares["red"].parent / "ddp.jsonl", colour_rows(squares) + colour_rows(squares, ["blue", "red"]))
    args = ["finetune", "--model", str(tiny_ckpt), "--data", str(data), "--steps", "3", "--lr", "1e-3",
            "--no-progress", "--device", "cpu", "--lora-dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SMOLVLM_DDP_BACKEND": "gloo"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "smolvlm.cli", *args,
                          "--batch-size", "1", "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = finetune(FinetuneConfig(model=str(tiny_ckpt), data=str(data), output=str(tmp_path / "one"), steps=3, lr=1e-3,
                                  batch_size=2, progress=False))
    two_losses = [json.loads(line)["loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(two_losses) == len(one.losses) == 3
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(two_losses, one.losses)), (two_losses, one.losses)
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    # Adam divides each gradient element by its own running magnitude: a rounding-level difference in
    # the gradient (1e-5 relative) moves an element by ~1e-5 x lr per step, except where the gradient
    # itself is at rounding level, whose update direction is noise in both runs. Bound: lr / 100 over 3 steps.
    moved = {k: float((b[k] - a[k]).abs().max()) for k in a}
    assert max(moved.values()) <= 1e-3 / 100, sorted(moved.items(), key=lambda kv: -kv[1])[:3]
    close = sum(int(((b[k] - a[k]).abs() <= 1e-6 + 1e-5 * a[k].abs()).sum()) for k in a)
    assert close >= 0.999 * sum(v.numel() for v in a.values()), close


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (240, 220, 30)}


@pytest.mark.slow
def test_it_learns_colours_and_answers_held_out_squares_through_the_cli(grafted_ckpt, tmp_path, capsys):
    """A few minutes of LoRA on CPU: the real SmolLM2 decoder learns to name the colour of a square seen
    through a (random) vision tower, and `smolvlm run --adapter` names squares it never saw."""
    from smolvlm.cli import main

    rows = []
    for name, rgb in COLOURS.items():
        for i, shift in enumerate((-25, 25)):  # squares: each becomes one whole 512 x 512 tile
            Image.new("RGB", (48 + 16 * i,) * 2, tuple(max(0, min(255, c + shift)) for c in rgb)).save(tmp_path / f"{name}{i}.png")
            rows.append({"messages": [user({"type": "image", "path": f"{name}{i}.png"}, text("What colour is this?")),
                                      answer(name.capitalize() + ".")]})
        Image.new("RGB", (40, 40), rgb).save(tmp_path / f"held_{name}.png")  # a shade between, another size
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["finetune", "--model", str(grafted_ckpt), "--data", str(data), "--output", str(tmp_path / "out"),
                 "--epochs", "6", "--batch-size", "4", "--lr", "2e-3", "--warmup", "2", "--no-image-splitting",
                 "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < 0.2 * losses[0], losses
    capsys.readouterr()
    for name in COLOURS:
        assert main(["run", "--model", str(grafted_ckpt), "--adapter", str(tmp_path / "out"), "--image",
                     str(tmp_path / f"held_{name}.png"), "--no-image-splitting", "-n", "4", "What colour is this?"]) == 0
        said = capsys.readouterr().out.strip()
        assert said.startswith(name.capitalize()), f"held-out {name} square: the model said {said!r} (losses {losses})"


def test_cli_flags_and_adapters_are_checked_before_any_work(tiny_ckpt, squares, tmp_path, capsys):
    from smolvlm.cli import main

    data = write_jsonl(squares["red"].parent / "cli.jsonl", colour_rows(squares, ["red"]))
    base = ["finetune", "--model", str(tiny_ckpt), "--output", str(tmp_path / "o"), "--no-progress"]
    for extra, message in (
        (["--data", str(data), "--lora-rank", "0"], "nothing to train"),
        (["--data", str(data), "--train", "decoder"], "LoRA on the decoder as well"),
        (["--data", str(data), "--train", "eyes"], "unknown part"),
        (["--data", str(data), "--steps", "2", "--epochs", "1"], "not both"),
        (["--data", str(data), "--dtype", "float32", "--lr", "-1"], "--lr must be a positive"),
        (["--data", str(tmp_path / "none.jsonl")], "does not exist"),
        (["--data", str(data), "--lora-targets", "q_proj,eyes"], "unknown LoRA target"),
        (["--data", str(data), "--resume", "latest"], "no checkpoint-STEP directory"),
        (["--data", str(tiny_ckpt / "config.json")], "not valid JSON"),
    ):
        assert main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert main(["run", "--model", str(tiny_ckpt), "--adapter", str(tmp_path), "hi"]) == 1
    assert "not an adapter directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    shown = capsys.readouterr().out
    for option in ("--data", "--eval-data", "--lora-rank", "--lora-alpha", "--lora-targets", "--train", "--steps",
                   "--epochs", "--lr", "--batch-size", "--grad-accum", "--warmup", "--dtype", "--gradient-checkpointing",
                   "--seed", "--resume", "--no-image-splitting", "--skip-bad-examples", "--save-every", "torchrun"):
        assert option in shown, option


def test_bfloat16_autocast_trains_close_to_fp32(tiny_ckpt, squares, tmp_path):
    data = write_jsonl(squares["red"].parent / "bf16.jsonl", colour_rows(squares))
    runs = {dtype: finetune(FinetuneConfig(model=str(tiny_ckpt), data=str(data), output=str(tmp_path / dtype), steps=2,
                                           batch_size=3, lr=1e-3, dtype=dtype, progress=False)).losses
            for dtype in ("float32", "bfloat16")}
    # bf16 keeps 8 bits of mantissa: each product is within ~2^-8 relative; the mean loss far closer
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(runs["float32"], runs["bfloat16"])), runs
    assert runs["float32"] != runs["bfloat16"]  # autocast did run in bf16


def test_jsonl_with_several_images_a_video_and_text_only_trains_with_the_cache(tiny_ckpt, squares, short_video, tmp_path):
    folder = squares["red"].parent
    shutil.copy(short_video, folder / "clip.mp4")
    rows = [
        {"messages": [user({"type": "image", "path": "red.png"}, {"type": "image", "path": "green.png"}, text("Which is red?")),
                      answer("The first.")]},
        {"messages": [user({"type": "video", "path": "clip.mp4"}, text("What moves?")), answer("The cup.")]},
        {"messages": [user(text("Say hi.")), answer("Hi.")]},
    ]
    data = write_jsonl(folder / "mixed_media.jsonl", rows)
    processor = Processor.from_pretrained(tiny_ckpt)
    examples, _ = read_examples(data, processor, {}, progress=False)
    assert [e.num_labels for e in examples] == [4, 4, 3]  # " The first." / " The cup." / " Hi." + <end_of_utterance>
    result = finetune(FinetuneConfig(model=str(tiny_ckpt), data=str(data), output=str(tmp_path / "o"), epochs=2,
                                     batch_size=3, lr=1e-3, progress=False))
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses) and result.losses[1] < result.losses[0]


def test_accumulating_micro_batches_follows_the_same_curve_as_one_batch(tiny_ckpt, squares, tmp_path):
    data = write_jsonl(squares["red"].parent / "accum.jsonl", colour_rows(squares) + colour_rows(squares, ["blue"]))
    common = dict(model=str(tiny_ckpt), data=str(data), steps=3, lr=1e-3, progress=False)
    one = finetune(FinetuneConfig(output=str(tmp_path / "one"), batch_size=4, **common)).losses
    accumulated = finetune(FinetuneConfig(output=str(tmp_path / "acc"), batch_size=1, grad_accum=4, **common)).losses
    assert len(one) == len(accumulated) == 3
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(one, accumulated)), (one, accumulated)
