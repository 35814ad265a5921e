"""Fine-tuning step time and peak memory: smolvlm against transformers + PEFT, same data, batch, dtype.

    python tools/bench_finetune.py                           # grafted 256M-shape checkpoint, fp32, CPU
    python tools/bench_finetune.py --model DIR --steps 5 --batch-size 2 --splitting --dtype bfloat16
    python tools/bench_finetune.py --smoke                   # seconds: tiny checkpoint (numbers meaningless)

What runs. Each side in its own fresh child process ("spawn": it imports only its own framework, so
its peak memory is its own), one after the other, smolvlm first:
    both      the checkpoint in fp32, LoRA r=8 alpha=16 on the decoder's seven projections (the same
              regular expression for both), vision tower frozen, AdamW(lr=1e-4) on the adapters,
              `--dtype bfloat16`: the forward under torch.autocast (weights stay fp32)
    data      `--batch-size` conversations, each one photo-like image of random noise (different per
              step, so nothing can be reused between steps) and a 12-token answer; the tensors come
              from our processor (identical to transformers' processor, tests/test_processor.py) and
              the very same tensors go to both sides
    smolvlm   `LanguageModelLoss` (smolvlm/train/loss.py) with no feature cache, sum / labelled tokens
    peft      `peft.get_peft_model(SmolVLMForConditionalGeneration, LoraConfig)`, `model(**batch,
              labels=...).loss`
    a step    forward + backward + optimizer step + zero_grad; `--warmup` steps untimed, then
              `--steps` timed; the median is reported
    memory    peak resident memory (VmHWM) over the timed steps (reset after loading and warm-up),
              and the process peak including loading
A third row, smolvlm with its feature cache on the *same* images again (a later epoch of a small
dataset: the frozen tower is skipped), shows what the cache buys; transformers has no equivalent.

Prints a markdown table (and `--json PATH` writes the samples). The CPU and thread count are named.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = r"model\.text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_batches(model_dir: str, count: int, batch_size: int, splitting: bool, seed: int):
    import numpy as np
    from PIL import Image

    from smolvlm.processing import Processor
    from smolvlm.train.data import collate

    processor = Processor.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_finetune_{os.getpid()}"
    folder.mkdir(exist_ok=True)
    batches = []
    for b in range(count):
        labelled = []
        for r in range(batch_size):
            path = folder / f"{b}_{r}.png"
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path)
            conversation = [
                {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Describe this image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Coloured noise: every pixel random, no object."}]},
            ]
            labelled.append(processor.prepare_labelled(conversation, do_image_splitting=splitting))
        batches.append(collate(processor, labelled, [str(r) for r in range(batch_size)]))
    return batches


def child(side: str, args: dict, queue) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    total = args["warmup"] + args["steps"]
    batches = make_batches(args["model"], total, args["batch_size"], args["splitting"], seed=1)
    if side == "smolvlm-cached":  # a later epoch: the same images again
        batches = batches[:1] * total
    start = time.perf_counter()
    if side.startswith("smolvlm"):
        from smolvlm.model import SmolVLM
        from smolvlm.train.lora import LoraConfig, add_lora
        from smolvlm.engine.runner import VisionFeatureCache
        from smolvlm.train.loss import LanguageModelLoss

        model = SmolVLM.from_pretrained(args["model"])
        model.requires_grad_(False)
        add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        objective = LanguageModelLoss(model, feature_cache=VisionFeatureCache(2**30) if side == "smolvlm-cached" else None)

        def loss_of(batch):
            return objective(batch) / batch.num_labels
    else:
        import peft
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args["model"], dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))

        def loss_of(batch):
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                         pixel_attention_mask=batch.pixel_attention_mask, labels=batch.labels).loss
    load_s = time.perf_counter() - start
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args["dtype"] == "bfloat16")
    times, losses = [], []
    for i, batch in enumerate(batches):
        if i == args["warmup"]:
            peak_before = rss_mb("VmHWM")  # loading and warm-up
            reset_peak_rss()
            before = rss_mb("VmRSS")
        t = time.perf_counter()
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    queue.put({"side": side, "load_s": load_s, "step_s": times, "losses": losses, "rss_before_steps_mb": before,
               "peak_steps_mb": rss_mb("VmHWM"),
               "process_peak_mb": max(peak_before, rss_mb("VmHWM")), "trainable": sum(p.numel() for p in params),
               "tokens_per_batch": int(batches[0].attention_mask.sum())})


def run_side(side: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=child, args=(side, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the grafted test checkpoint)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--splitting", action="store_true", help="split images into tiles (13 per 640x480 image)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint, 2 steps: checks the tool, not speed")
    parser.add_argument("--json", default=None, help="write the samples here")
    a = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import cached_checkpoint  # builds the test checkpoint if it is not cached

    model = a.model or str(cached_checkpoint("tiny" if a.smoke else "grafted"))
    args = {"model": model, "steps": 2 if a.smoke else a.steps, "warmup": 1 if a.smoke else a.warmup,
            "batch_size": a.batch_size, "splitting": a.splitting, "dtype": a.dtype, "threads": a.threads}
    results = [run_side(side, args) for side in ("smolvlm", "peft", "smolvlm-cached")]
    by = {r["side"]: r for r in results}
    print(f"\nfine-tuning step, {Path(model).name}, {a.dtype}, batch {a.batch_size} x "
          f"{'split' if a.splitting else 'one-tile'} image, {by['smolvlm']['tokens_per_batch']} tokens per batch; "
          f"{cpu_name()}, {a.threads} threads; median of {args['steps']} steps\n")
    print("| side | step (s) | vs peft | peak memory in steps (MiB) | vs peft | process peak (MiB) | loss, first step |")
    print("|---|---|---|---|---|---|---|")
    ref = by["peft"]
    for r in results:
        step = statistics.median(r["step_s"])
        extra = r["peak_steps_mb"] - r["rss_before_steps_mb"]
        ref_extra = ref["peak_steps_mb"] - ref["rss_before_steps_mb"]
        print(f"| {r['side']} | {step:.2f} | {step / statistics.median(ref['step_s']):.2f}x | "
              f"{r['peak_steps_mb']:.0f} (+{extra:.0f} over the loaded model) | {r['peak_steps_mb'] / ref['peak_steps_mb']:.2f}x "
              f"(+{extra / max(ref_extra, 1):.2f}x) | {r['process_peak_mb']:.0f} | {r['losses'][0]:.4f} |")
    print(f"\nsame first-step loss (same data, same weights, adapters start at B = 0): smolvlm "
          f"{by['smolvlm']['losses'][0]:.6f}, peft {ref['losses'][0]:.6f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": args, "cpu": cpu_name(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
