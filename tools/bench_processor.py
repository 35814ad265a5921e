"""Time our Processor against transformers' on one 512² image and one 64-frame video.

    python tools/bench_processor.py [--processor-dir DIR] [--repeats 5] [--threads 2] [--json out.json]
    python tools/bench_processor.py --smoke [--processor-dir DIR]   # seconds: tiny processor, short clip

Both sides get the same files and produce the same tensors (checked here too). transformers is timed
with the Pillow image processor (the parity reference) and with its default torchvision one; its
video path is `load_video(backend="decord")` + the processor, since torchcodec is not installed.
Each number is the median wall time of `--repeats` runs after one warm-up run.

Measured (2-core CPU shared with other jobs, load ~5, torch 2.14, transformers 5.24, 5 repeats):
    image 512² (17 tiles)           ours 0.35 s   transformers Pillow 0.43 s   transformers torchvision 1.51 s
    video 70 s 640x480 (64 frames)  ours 2.46 s   transformers 2.97 s
Outputs identical in both cases (pixel_values max abs diff 0.0). ~80% of the video time is the two
LANCZOS resizes (640x480 -> 2048x1536 -> 512x512) that transformers' config quirk imposes.

Smoke mode (--smoke): the same rows and parity checks, 1 repeat, on the tiny test checkpoint's processor
(64 px tiles; built into the test cache if missing, or --processor-dir) with a 6 s 160x120 clip (6 frames):
checks the tool runs, in seconds. The script exits 1 when ours and transformers' ids, masks or pixel values
differ. --json writes {"processor_dir", "repeats", "threads", "rows": [{"input", "implementation",
"seconds", "images"}], "parity": [{"input", "reference", "ids_masks_identical", "pixel_max_abs_diff"}]};
`images` is the number of tiles / frames in pixel_values.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_processor_dir(kind: str = "tokenizer") -> Path:
    """The test cache's checkpoint directory of `kind` (default: processor files only), built with
    tools/make_checkpoints.py if missing."""
    spec = importlib.util.spec_from_file_location("make_checkpoints", REPO_ROOT / "tools" / "make_checkpoints.py")
    builder = importlib.util.module_from_spec(spec)
    sys.modules["make_checkpoints"] = builder  # dataclasses look their module up while the file runs
    spec.loader.exec_module(builder)
    out = REPO_ROOT / ".cache" / "test-checkpoints" / f"{kind}-v{builder.BUILDER_VERSION}"
    if not (out / "BUILDER_VERSION").is_file():
        builder.build_atomically(kind, out)
    return out


def write_inputs(directory: Path, seconds: int = 70, width: int = 640, height: int = 480) -> tuple[Path, Path]:
    """A 512² photo and a `seconds` long, 2 fps clip (70 s: 64 frames are sampled from it)."""
    import av
    from skimage import data

    image_path = directory / "astronaut.png"
    Image.fromarray(data.astronaut()).save(image_path)
    video_path = directory / "clip.mp4"
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    with av.open(str(video_path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        total = 2 * seconds
        for i in range(total):
            frame = np.asarray(Image.fromarray(sources[i * 4 // total]).resize((width, height)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(frame, 5 * i, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return image_path, video_path


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor-dir", type=Path, default=None,
                        help="default: the test cache's tokenizer checkpoint (smoke: its tiny one)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (smoke: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the timings and parity checks here")
    parser.add_argument("--smoke", action="store_true",
                        help="1 repeat, tiny processor, 6 s 160x120 clip: checks the tool runs (seconds)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    torch.set_num_threads(args.threads)

    from transformers import AutoProcessor
    from transformers.models.smolvlm import SmolVLMImageProcessorPil, SmolVLMProcessor
    from transformers.video_utils import load_video

    from smolvlm.processing import Processor

    directory = args.processor_dir or default_processor_dir("tiny" if args.smoke else "tokenizer")
    ours = Processor.from_pretrained(directory)
    ref_pil = SmolVLMProcessor.from_pretrained(directory, image_processor=SmolVLMImageProcessorPil.from_pretrained(directory))
    ref_default = AutoProcessor.from_pretrained(directory)

    with tempfile.TemporaryDirectory() as tmp:
        video_seconds, video_size = (6, (160, 120)) if args.smoke else (70, (640, 480))
        image_path, video_path = write_inputs(Path(tmp), video_seconds, *video_size)
        with Image.open(image_path) as image:
            image_name = f"image {image.width}x{image.height}"
        video_name = f"video {video_seconds} s {video_size[0]}x{video_size[1]}"
        image_msgs = [{"role": "user", "content": [{"type": "image", "path": str(image_path)}, {"type": "text", "text": "Describe."}]}]
        video_msgs = [{"role": "user", "content": [{"type": "video", "path": str(video_path)}, {"type": "text", "text": "Describe."}]}]

        def apply(ref, messages):
            return ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")

        def tf_video(ref):
            vp = ref.video_processor
            frames, meta = load_video(
                str(video_path), backend="decord",
                sample_indices_fn=lambda metadata, **kw: vp.sample_frames(metadata, num_frames=vp.num_frames, fps=vp.fps),
            )
            text = ref.apply_chat_template(video_msgs, add_generation_prompt=True)
            return ref(text=text, videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")

        pil, default, decord = ("transformers, Pillow image processor", "transformers, default (torchvision) image processor",
                                "transformers (decord + video processor)")
        rows = [
            (image_name, "ours", lambda: ours(image_msgs)),
            (image_name, pil, lambda: apply(ref_pil, image_msgs)),
            (image_name, default, lambda: apply(ref_default, image_msgs)),
            (video_name, "ours", lambda: ours(video_msgs)),
            (video_name, decord, lambda: tf_video(ref_pil)),
        ]
        results = {}
        report = {"processor_dir": str(directory), "repeats": args.repeats, "threads": args.threads, "rows": [], "parity": []}
        print(f"processor dir: {directory}\ntorch threads: {args.threads}, median of {args.repeats} runs\n")
        print(f"{'input':32} {'implementation':55} {'seconds':>8} {'images':>6}")
        for name, impl, fn in rows:
            seconds, out = median_seconds(fn, args.repeats)
            results[(name, impl)] = out
            images = out["pixel_values"].shape[1]  # [batch, tiles or frames, 3, H, W]
            print(f"{name:32} {impl:55} {seconds:8.3f} {images:6d}")
            report["rows"].append({"input": name, "implementation": impl, "seconds": seconds, "images": images})

        ok = True
        for name, reference in ((image_name, pil), (video_name, decord)):
            a, b = results[(name, "ours")], results[(name, reference)]
            same = all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "pixel_attention_mask"))
            same_shape = a["pixel_values"].shape == b["pixel_values"].shape
            pixel_diff = (a["pixel_values"] - b["pixel_values"]).abs().max().item() if same_shape else float("inf")
            ok = ok and same and pixel_diff <= 1e-6
            print(f"\n{name}: ids/masks identical: {same}; pixel_values max abs diff vs {reference}: {pixel_diff}")
            report["parity"].append({"input": name, "reference": reference, "ids_masks_identical": same,
                                     "pixel_max_abs_diff": pixel_diff})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if not ok:
        print("ours and transformers' outputs differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
