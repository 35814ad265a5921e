"""Our activations against transformers', stage by stage and layer by layer.

    python tools/compare_with_transformers.py --model DIR [--image PHOTO]... [--prompt TEXT] [--dtype float32]
    python tools/compare_with_transformers.py --smoke [--model DIR]      # tiny test checkpoint, seconds

For anyone porting a change or checking a new checkpoint: one conversation goes through our
processor, then through our model (`run_with_cache`) and transformers' `SmolVLMForConditionalGeneration`
(sdpa, `output_hidden_states=True`; its vision tower called alone for the vision layers). Printed per
stage: max and mean abs difference, and the largest |value| for scale. Rows:

    vision.embeddings, vision.layers.i, vision.post_layernorm   same tiles in, transformers' vision tower
    connector                                                   from transformers' vision output
    inputs_embeds                                               transformers' full forward (its own image path)
    text.layers.i, text.norm, logits                            transformers' decoder from OUR inputs_embeds,
                                                                so an earlier difference is not carried along
    logits (end to end)                                         transformers' full forward

--json OUT writes {"model", "rows": [{"stage", "max_abs", "mean_abs", "ref_max_abs"}]}. The script
exits 1 when a row is not finite or its max diff exceeds --fail-above (default: never).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))


def compare(model_dir: Path, images: list[Path], prompt: str, dtype: torch.dtype) -> list[dict]:
    from PIL import Image
    from transformers import SmolVLMForConditionalGeneration

    from smolvlm import SmolVLM
    from smolvlm.processing import Processor
    from smolvlm.vision import patch_mask_from_pixels

    processor = Processor.from_pretrained(model_dir)
    ours = SmolVLM.from_pretrained(model_dir, dtype=dtype)
    theirs = SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    content = [{"type": "image", "image": Image.open(p)} for p in images] + [{"type": "text", "text": prompt}]
    batch = processor([{"role": "user", "content": content}])
    pixels, mask = batch.get("pixel_values"), batch.get("pixel_attention_mask")
    rows = []

    def row(stage: str, a: torch.Tensor, b: torch.Tensor) -> None:
        diff = (a.float() - b.float()).abs()
        rows.append({"stage": stage, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                     "ref_max_abs": float(b.float().abs().max())})

    with torch.no_grad():
        logits, cache = ours.run_with_cache(batch["input_ids"], pixels, mask)
        if pixels is not None:
            tiles, pixel_mask = ours._real_tiles(pixels, mask)
            patch_mask = patch_mask_from_pixels(pixel_mask, ours.config.vision.patch_size)
            vision = theirs.model.vision_model(pixel_values=tiles.to(dtype), patch_attention_mask=patch_mask,
                                               output_hidden_states=True)
            row("vision.embeddings", cache["model.vision_model.embeddings"], vision.hidden_states[0])
            for i in range(ours.config.vision.num_hidden_layers):
                row(f"vision.layers.{i}", cache[f"model.vision_model.encoder.layers.{i}"], vision.hidden_states[i + 1])
            row("vision.post_layernorm", cache["model.vision_model"], vision.last_hidden_state)
            row("connector", cache["model.connector"], theirs.model.connector(vision.last_hidden_state))
        full = theirs(**batch, output_hidden_states=True)  # its own image path, end to end
        embeds = cache["model.text_model.inputs_embeds"]
        row("inputs_embeds", embeds, full.hidden_states[0])
        decoder = theirs(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
        layers = ours.config.text.num_hidden_layers
        for i in range(layers - 1):  # transformers' last hidden state is after the final norm
            row(f"text.layers.{i}", cache[f"model.text_model.layers.{i}"], decoder.hidden_states[i + 1])
        row("text.norm", cache["model.text_model.norm"], decoder.hidden_states[-1])
        row("logits", logits, decoder.logits)
        row("logits (end to end)", logits, full.logits)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (with processor files)")
    parser.add_argument("--image", type=Path, action="append", default=[], help="an image (repeatable)")
    parser.add_argument("--prompt", default="What is in this picture?")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--fail-above", type=float, default=math.inf, help="exit 1 if any max diff is larger")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the tiny test checkpoint and a generated photo")
    args = parser.parse_args(argv)
    if args.smoke:
        from bench_processor import default_processor_dir

        args.model = args.model or default_processor_dir("tiny")
        if not args.image:
            from PIL import Image
            from skimage import data

            photo = Path(__import__("tempfile").mkdtemp()) / "coffee.png"
            Image.fromarray(data.coffee()).save(photo)
            args.image = [photo]
    if args.model is None:
        parser.error("--model is required (or --smoke)")
    for image in args.image:
        if not image.is_file():
            parser.error(f"image not found: {image}")
    rows = compare(args.model, args.image, args.prompt, getattr(torch, args.dtype))
    print(f"{'stage':<24}{'max abs diff':>14}{'mean abs diff':>15}{'max |ref|':>12}")
    worst = 0.0
    for r in rows:
        print(f"{r['stage']:<24}{r['max_abs']:>14.3g}{r['mean_abs']:>15.3g}{r['ref_max_abs']:>12.4g}")
        worst = max(worst, r["max_abs"]) if math.isfinite(r["max_abs"]) else math.inf
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=1))
    return 1 if worst > args.fail_above else 0


if __name__ == "__main__":
    sys.exit(main())
