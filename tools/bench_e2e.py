"""End-to-end CPU benchmark: smolvlm against transformers on the same checkpoint, inputs, dtype, threads.

    python tools/bench_e2e.py                       # everything, bf16 and fp32, 2 threads (~20-30 min here)
    python tools/bench_e2e.py --quick               # short answers, 4 scenarios (~5 min here)
    python tools/bench_e2e.py --smoke --json out.json  # seconds: tiny checkpoint, fp32, photo, 3 tokens
    python tools/bench_e2e.py --dtype bf16 --scenarios text photo --repeats 3 \
        --json out.json --markdown out.md --model DIR
    python tools/bench_e2e.py --profile profile.txt --dtype bf16   # where smolvlm's time goes
    python tools/bench_e2e.py --from-json out.json --markdown out.md  # re-summarise saved samples

What runs. For each dtype and scenario, two fresh child processes, one per framework (`multiprocessing`
with "spawn": a child imports only its own framework, so its peak resident memory is its own). Both are
alive together and take turns, repeat by repeat (smolvlm first on even repeats, transformers first on odd
ones); every metric is the median over repeats. Each child loads its model (timed), warms up on a short
text answer and a one-tile image, then runs the scenario:

    text       text-only chat question, fixed-length answer (decode speed)
    photo      one 512² photograph, split into 4x4 tiles + the global one (17 tiles)
    images3    three photographs in one question, unsplit (3 tiles; split they would be 43)
    video12    a 12 s clip sampled at 1 fps (12 frames); then a *second question* about the same clip
               on the same engine, reported as `video12-followup` (smolvlm hits its prefix cache and
               vision-feature cache; transformers has no cross-request cache and re-encodes)
    video64    a 70 s clip: 64 frames (the processor's cap); run once whatever --repeats says
    batch8     8 different text questions at once (aggregate generated tokens/s)

Metrics per single request, all wall-clock from the conversation (messages with file paths):
    preprocess  messages -> token ids + pixel tensors
    vision      vision tower + connector (timed inside the real run by wrapping the model's
                image-feature method on the instance: smolvlm `SmolVLM.image_features`,
                transformers `SmolVLMModel.get_image_features`)
    prefill     time to first token - preprocess - vision (decoder over the prompt, first token)
    ttft        messages in -> first generated token out
    decode      (N - 1) / (end - first token), N generated tokens, N forced: smolvlm
                `SamplingParams(ignore_eos=True)`, transformers `min_new_tokens=N`
    peak_rss    the scenario child's peak resident memory, `ru_maxrss` at its end (model included)
    others_cpu  share of the machine's CPU time used by *other* processes while a sample ran: this
                machine is shared, and with 2 threads on 2 cores any other job stalls every parallel op
plus `load` (checkpoint -> ready model and processor), one sample per child.

How the two sides are driven:
    smolvlm       `Engine.from_pretrained(dir, dtype, device="cpu")` with default options; every first
                  question runs on a fresh `Engine` around the already loaded model (empty prefix and
                  vision caches, as for a new image); requests go through `add_request` + `step`.
    transformers  `SmolVLMForConditionalGeneration.from_pretrained(dir, dtype=...)`, the Pillow image
                  processor (the parity reference; identical tensors to ours), videos decoded with
                  `load_video(backend="decord")` (torchcodec is not installed), `generate(do_sample=False)`
                  with a streamer that stamps the first new token; batches are left-padded.
Greedy token ids of both sides are kept, and the table says whether they agree (up to smolvlm's first
stop token: past it, `ignore_eos` and `min_new_tokens` continue differently by design).

This machine is shared: before each sample the parent waits (up to --quiet-wait s) for other processes
to leave the CPU idle, and records how much CPU they took during the sample anyway (`others_cpu`).

Memory bandwidth: STREAM-like copy / scale-add / read (sum) over 256 MiB fp32 buffers with the same thread
count; the decode limit is bandwidth / (bytes read per generated token: decoder + lm_head weights + the
KV cache of the context), and each decode speed is also given as a fraction of that limit.

Smoke mode (--smoke): checks the tool end to end in well under a minute, numbers meaningless. Same two
children and tables, but on the tiny test checkpoint (`tiny-v1` in the test cache, built there if missing;
--model overrides), fp32 only, the photo scenario only (--dtype / --scenarios override), answers of 3-4
tokens, 1 repeat, no waiting for a quiet CPU and no retries (unless --quiet-wait / --retries are given),
16 MiB bandwidth buffers, only the media files the chosen scenarios use, and the two children of a scenario
start at the same time (their load times overlap).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = REPO_ROOT / ".cache" / "test-checkpoints"
DEFAULT_MODEL = TEST_CACHE / "grafted-v1"
FRAMEWORKS = ("smolvlm", "transformers")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
ALL_SCENARIOS = ("text", "photo", "images3", "video12", "video64", "batch8")

TEXT_QUESTIONS = [
    "Explain how photosynthesis works.",
    "Explain in detail how a bicycle works, part by part.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Describe the water cycle step by step.",
    "Give me three tips for learning a new language.",
    "How does a refrigerator keep food cold?",
    "Why is the sky blue?",
]


# =============================================================================================
# Scenarios and inputs
# =============================================================================================


@dataclass(frozen=True)
class Scenario:
    name: str
    new_tokens: int  # generated tokens per request, forced (eos ignored)
    conversations: list  # one request (or, for batch8, one batch) per entry, asked in order
    batch: bool = False  # all conversations at once (throughput) instead of one after the other
    report_names: tuple[str, ...] = ()  # the row each request of `conversations` is reported under
    processor_options: dict = field(default_factory=dict)  # e.g. {"do_image_splitting": False}, both sides
    max_repeats: int | None = None  # cap on --repeats for the slowest scenarios


def user(*content: dict) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


ANSWER_LENGTHS = {"full": (64, 16, 32), "quick": (16, 4, 8), "smoke": (4, 3, 4)}  # long, short, batch answers


def make_scenarios(media: dict[str, Path], names: list[str], lengths: str = "full") -> list[Scenario]:
    long_answer, short_answer, batch_answer = ANSWER_LENGTHS[lengths]
    image = lambda key: {"type": "image", "path": str(media[key])}  # noqa: E731
    video = lambda key: {"type": "video", "path": str(media[key])}  # noqa: E731
    table = {  # built on demand: only the chosen scenarios' media exist
        "text": lambda: Scenario("text", long_answer, [user(text(TEXT_QUESTIONS[0]))], report_names=("text",)),
        "photo": lambda: Scenario(
            "photo", short_answer, [user(image("astronaut"), text("Can you describe this image?"))], report_names=("photo",)
        ),
        "images3": lambda: Scenario(  # unsplit (one 512² tile each): split, these would be 17 + 13 + 13 tiles
            "images3",
            short_answer,
            [user(image("astronaut"), image("coffee"), image("chelsea"), text("What do these three pictures have in common?"))],
            report_names=("images3",),
            processor_options={"do_image_splitting": False},
        ),
        "video12": lambda: Scenario(
            "video12",
            short_answer,
            [user(video("clip12"), text("Describe this video.")), user(video("clip12"), text("What colours dominate this video?"))],
            report_names=("video12", "video12-followup"),
        ),
        "video64": lambda: Scenario(
            "video64", short_answer, [user(video("clip64"), text("Describe this video."))], report_names=("video64",),
            max_repeats=1,  # minutes per run on 2 cores
        ),
        "batch8": lambda: Scenario("batch8", batch_answer, [[user(text(q)) for q in TEXT_QUESTIONS]], batch=True, report_names=("batch8",)),
    }
    return [table[n]() for n in names]


def write_media(directory: Path, scenarios: list[str] | None = None) -> dict[str, Path]:
    """Photos from scikit-image (nothing downloads) and two H.264 clips written with PyAV; the clips only
    when `scenarios` (default: all) include the one that uses them."""
    from PIL import Image
    from skimage import data

    paths = {}
    for name, array in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea())):
        paths[name] = directory / f"{name}.png"
        Image.fromarray(array).save(paths[name])
    # 1 fps sampling: a 12 s clip gives 12 frames; a 70 s clip gives 64 (the cap; 1 s skipped at each end).
    if scenarios is None or "video12" in scenarios:
        paths["clip12"] = write_video(directory / "clip12.mp4", seconds=12, fps=2)
    if scenarios is None or "video64" in scenarios:
        paths["clip64"] = write_video(directory / "clip64.mp4", seconds=70, fps=2)
    return paths


def write_video(path: Path, *, seconds: int, fps: int, width: int = 320, height: int = 240) -> Path:
    """`seconds * fps` distinct frames: the coffee photo rolled sideways, with a moving white bar."""
    import av
    import numpy as np
    from PIL import Image
    from skimage import data

    base = np.asarray(Image.fromarray(data.coffee()).resize((width, height), Image.Resampling.BILINEAR))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for index in range(seconds * fps):
            frame = np.roll(base, shift=4 * index, axis=1).copy()  # (H, W, 3)
            frame[(7 * index) % height, :, :] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# =============================================================================================
# Measurements shared by both children
# =============================================================================================


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM is the peak since the process started


def peak_rss_mb() -> float:
    """VmHWM: the peak resident memory since start or since the last `reset_peak_rss`, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageTimer:
    """Wraps a bound method on its instance and adds up the seconds spent in it."""

    def __init__(self, owner: Any, method_name: str):
        self.seconds = 0.0
        self.calls = 0
        original = getattr(owner, method_name)

        @functools.wraps(original)  # keeps the signature: transformers' generate inspects it
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(owner, method_name, timed)  # instance attribute: shadows the class's method

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def request_metrics(t0: float, t_preprocessed: float, t_first: float, t_end: float, vision_s: float, n: int) -> dict:
    ttft = t_first - t0
    preprocess = t_preprocessed - t0
    return {
        "preprocess_s": preprocess,
        "vision_s": vision_s,
        "prefill_s": ttft - preprocess - vision_s,
        "ttft_s": ttft,
        "total_s": t_end - t0,
        "new_tokens": n,
        "decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else None,
    }


# =============================================================================================
# The smolvlm child
# =============================================================================================


class SmolvlmRunner:
    framework = "smolvlm"

    def __init__(self, model_dir: Path, dtype, options: dict):
        from smolvlm import Engine

        start = time.perf_counter()
        self.engine = Engine.from_pretrained(model_dir, dtype=dtype, device="cpu", **options)
        self.load_s = time.perf_counter() - start
        self.model = self.engine.model
        self.vision_timer = StageTimer(self.model, "image_features")
        self.text_params = self.model.config.text

    def fresh_engine(self):
        """A new Engine around the loaded model: empty prefix cache and vision-feature cache."""
        from smolvlm import Engine

        old = self.engine
        config, processor, stop = old.config, old.processor, tuple(old.stop_token_ids)
        self.engine = None
        del old  # free its KV cache before allocating the next one
        self.engine = Engine(self.model, processor, config, eos_token_ids=stop)
        return self.engine

    def params(self, n: int):
        from smolvlm import SamplingParams

        return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)

    def one_request(self, engine, conversation, n: int, processor_options: dict) -> dict:
        self.vision_timer.reset()
        t0 = time.perf_counter()
        request_id = engine.add_request(conversation, self.params(n), **processor_options)  # runs the processor
        t_preprocessed = time.perf_counter()
        seq = engine.requests[request_id].seq
        t_first = None
        result = None
        while result is None:
            for out in engine.step():
                if out.request_id == request_id and out.result is not None:
                    result = out.result
            if t_first is None and seq.num_generated_tokens >= 1:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        if result.finish_reason == "error":
            raise RuntimeError(f"smolvlm request failed: {result.error}")
        metrics = request_metrics(t0, t_preprocessed, t_first, t_end, self.vision_timer.seconds, len(result.token_ids))
        metrics.update(
            prompt_tokens=result.num_prompt_tokens,
            cached_tokens=result.num_cached_tokens,
            vision_calls=self.vision_timer.calls,
            token_ids=result.token_ids,
        )
        return metrics

    def run(self, scenario: Scenario) -> list[dict]:
        engine = self.fresh_engine()
        if scenario.batch:
            conversations = scenario.conversations[0]
            t0 = time.perf_counter()
            results = engine.generate(conversations, self.params(scenario.new_tokens), **scenario.processor_options)
            seconds = time.perf_counter() - t0
            errors = [r.error for r in results if r.finish_reason == "error"]
            if errors:
                raise RuntimeError(f"smolvlm batch failed: {errors[0]}")
            generated = sum(len(r.token_ids) for r in results)
            return [{"total_s": seconds, "new_tokens": generated, "batch_tok_s": generated / seconds,
                     "token_ids": [r.token_ids for r in results]}]
        return [self.one_request(engine, c, scenario.new_tokens, scenario.processor_options) for c in scenario.conversations]

    def warm_up(self, media: dict[str, Path]) -> None:
        engine = self.fresh_engine()
        engine.generate(user(text("Hello!")), self.params(4))
        engine.generate(user({"type": "image", "path": str(media["chelsea"])}, text("Hi.")), self.params(2), do_image_splitting=False)

    def weight_bytes_per_token(self) -> int:
        """Weights a decode step reads: every decoder layer, the final norm and lm_head (not the embeddings)."""
        def size(module) -> int:  # parameters, and the int8 weights and scales of quantized layers (quant.py)
            tensors = [p for name, p in module.named_parameters() if "embed_tokens" not in name]
            tensors += [b for name, b in module.named_buffers() if name.endswith(("qweight", "scales"))]
            return sum(t.numel() * t.element_size() for t in tensors)

        return size(self.model.model.text_model) + size(self.model.lm_head)


# =============================================================================================
# The transformers child
# =============================================================================================


class FirstTokenStreamer:
    """generate() calls `put` with the prompt first, then with each new token: stamp the first new one."""

    def __init__(self):
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersRunner:
    framework = "transformers"

    def __init__(self, model_dir: Path, dtype, options: dict):
        import torch
        from transformers import SmolVLMForConditionalGeneration
        from transformers.models.smolvlm import SmolVLMImageProcessorPil, SmolVLMProcessor

        self.torch = torch
        start = time.perf_counter()
        self.model = SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.processor = SmolVLMProcessor.from_pretrained(
            model_dir, image_processor=SmolVLMImageProcessorPil.from_pretrained(model_dir)
        )
        self.load_s = time.perf_counter() - start
        self.processor.tokenizer.padding_side = "left"
        self.vision_timer = StageTimer(self.model.model, "get_image_features")
        self.pad_token_id = self.processor.tokenizer.pad_token_id

    def preprocess(self, conversations: list, processor_options: dict) -> dict:
        """Messages -> tensors, as transformers users do it; videos through decord (no torchcodec here)."""
        from transformers.video_utils import load_video

        videos, metadata = [], []
        for conversation in conversations:
            for message in conversation:
                for item in message["content"]:
                    if item["type"] == "video":
                        vp = self.processor.video_processor
                        frames, meta = load_video(
                            item["path"],
                            backend="decord",
                            sample_indices_fn=lambda metadata, **kw: vp.sample_frames(metadata, num_frames=vp.num_frames, fps=vp.fps),
                        )
                        videos.append(frames)
                        metadata.append(meta)
        if not videos:
            return self.processor.apply_chat_template(
                conversations if len(conversations) > 1 else conversations[0],
                add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True, **processor_options},
            )
        prompts = [self.processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.processor(
            text=prompts if len(prompts) > 1 else prompts[0], videos=videos, video_metadata=metadata,
            do_sample_frames=False, return_tensors="pt", padding=True, **processor_options,
        )

    def generate(self, inputs: dict, n: int, streamer=None):
        with self.torch.inference_mode():
            return self.model.generate(
                **inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=self.pad_token_id, streamer=streamer
            )

    def one_request(self, conversation, n: int, processor_options: dict) -> dict:
        self.vision_timer.reset()
        streamer = FirstTokenStreamer()
        t0 = time.perf_counter()
        inputs = self.preprocess([conversation], processor_options)
        t_preprocessed = time.perf_counter()
        out = self.generate(inputs, n, streamer)
        t_end = time.perf_counter()
        prompt_len = inputs["input_ids"].shape[1]
        token_ids = out[0, prompt_len:].tolist()
        metrics = request_metrics(t0, t_preprocessed, streamer.first_token_time, t_end, self.vision_timer.seconds, len(token_ids))
        metrics.update(prompt_tokens=prompt_len, cached_tokens=0, vision_calls=self.vision_timer.calls, token_ids=token_ids)
        return metrics

    def run(self, scenario: Scenario) -> list[dict]:
        if scenario.batch:
            t0 = time.perf_counter()
            inputs = self.preprocess(scenario.conversations[0], scenario.processor_options)
            out = self.generate(inputs, scenario.new_tokens)
            seconds = time.perf_counter() - t0
            new = out[:, inputs["input_ids"].shape[1] :]
            generated = new.numel()
            return [{"total_s": seconds, "new_tokens": generated, "batch_tok_s": generated / seconds,
                     "token_ids": new.tolist()}]
        return [self.one_request(c, scenario.new_tokens, scenario.processor_options) for c in scenario.conversations]

    def warm_up(self, media: dict[str, Path]) -> None:
        self.generate(self.preprocess([user(text("Hello!"))], {}), 4)
        image = user({"type": "image", "path": str(media["chelsea"])}, text("Hi."))
        self.generate(self.preprocess([image], {"do_image_splitting": False}), 2)


# =============================================================================================
# Child process: load, warm up, then serve scenarios over a pipe
# =============================================================================================


def child_main(connection, framework: str, dtype_name: str, model_dir: str, threads: int, media: dict, options: dict) -> None:
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, DTYPES[dtype_name])
    try:
        runner_class = SmolvlmRunner if framework == "smolvlm" else TransformersRunner
        runner = runner_class(Path(model_dir), dtype, options.get(framework, {}))
        info = {"load_s": runner.load_s, "rss_after_load_mb": peak_rss_mb()}
        if framework == "smolvlm":
            info["weight_bytes_per_token"] = runner.weight_bytes_per_token()
            engine = runner.engine
            info["decode_path"] = (f"C decode kernels {'on' if engine.cpu_kernels is not None else 'off'}, "
                                   f"attention backend `{engine.backend.name}`")
        start = time.perf_counter()
        runner.warm_up({k: Path(v) for k, v in media.items()})
        info["warm_up_s"] = time.perf_counter() - start
        connection.send(("ready", info))
        while True:
            message = connection.recv()
            if message is None:
                break
            scenario = message
            reset_peak_rss()
            samples = runner.run(scenario)
            connection.send(("result", {"samples": samples, "peak_rss_mb": peak_rss_mb()}))
        connection.send(("bye", {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops the run
        import traceback

        connection.send(("error", f"{framework} {dtype_name}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


class Child:
    def __init__(self, framework: str, dtype_name: str, args, media: dict[str, Path], options: dict, wait: bool = True):
        context = multiprocessing.get_context("spawn")
        self.framework = framework
        self.connection, child_end = context.Pipe()
        self.process = context.Process(
            target=child_main,
            args=(child_end, framework, dtype_name, str(args.model), args.threads, {k: str(v) for k, v in media.items()}, options),
            name=f"bench-{framework}-{dtype_name}",
            daemon=True,  # killed with the parent if the run stops on an error
        )
        self.process.start()
        self.info = self.receive("ready") if wait else None  # else the caller receives "ready" later

    def receive(self, expected: str) -> dict:
        kind, payload = self.connection.recv()
        if kind == "error":
            self.process.join(timeout=10)
            raise RuntimeError(payload)
        if kind != expected:
            raise RuntimeError(f"{self.framework} child sent {kind!r}, expected {expected!r}")
        return payload

    def run(self, scenario: Scenario) -> dict:
        self.connection.send(scenario)
        return self.receive("result")

    def close(self) -> dict:
        self.connection.send(None)
        payload = self.receive("bye")
        self.process.join(timeout=30)
        return payload


# =============================================================================================
# Machine: description and memory bandwidth
# =============================================================================================


def describe_machine(threads: int) -> dict:
    import torch

    cpu = "unknown"
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f} " in f" {flags} "]
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {
        "cpu": cpu,
        "isa": isa,
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "threads": threads,
        "load_average_start": os.getloadavg(),
    }


def measure_bandwidth(threads: int, megabytes: int = 256, repeats: int = 7) -> dict:
    """STREAM-like, in GB/s: copy (read + write), scale-add a = b + s*c (2 reads + 1 write), read (sum)."""
    import torch

    torch.set_num_threads(threads)
    n = megabytes * (1 << 20) // 4
    a, b, c = (torch.ones(n, dtype=torch.float32) for _ in range(3))

    def best(fn, bytes_moved: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return bytes_moved / min(times) / 1e9

    size = n * 4
    result = {
        "copy_gb_s": best(lambda: a.copy_(b), 2 * size),
        "triad_gb_s": best(lambda: torch.add(b, c, alpha=3.0, out=a), 3 * size),
        "read_gb_s": best(lambda: a.sum(), size),
        "buffer_mb": megabytes,
    }
    result["bandwidth_gb_s"] = max(result["copy_gb_s"], result["triad_gb_s"], result["read_gb_s"])
    return result


def kv_bytes_per_token(text_config: dict, context: float, element_size: int) -> float:
    """Bytes of K and V a decode step reads for a context of `context` tokens."""
    per_token = 2 * text_config["num_hidden_layers"] * text_config["num_key_value_heads"] * text_config["head_dim"]
    return per_token * context * element_size


# =============================================================================================
# The run: interleave the two children of each dtype, medians, tables
# =============================================================================================


def stop_tokens(model_dir: Path) -> set[int]:
    """`<end_of_utterance>` (49279 in SmolVLM2's vocabulary) and generation_config.json's eos."""
    stop = {49279}
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        stop.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return stop


def rerender(path: Path) -> dict:
    """A saved --json report with its medians and comparisons recomputed (after a change to `summarise`)."""
    report = json.loads(path.read_text())
    model = Path(report["model"])
    text_config = json.loads((model / "config.json").read_text())["text_config"]
    for dtype_name, run in report["runs"].items():
        weights = run["children"]["smolvlm"][0]["weight_bytes_per_token"]
        element_size = 2 if dtype_name == "bf16" else 4
        run["summary"] = summarise(run, weights, report["bandwidth"]["bandwidth_gb_s"], text_config, element_size, stop_tokens(model))
    return report


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_benchmark(args) -> dict:
    import torch

    machine = describe_machine(args.threads)
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']}, "
          f"transformers {machine['transformers']}, {args.threads} threads, load average {machine['load_average_start']}", flush=True)
    wait_for_quiet(args.quiet_wait)
    bandwidth = measure_bandwidth(args.threads, **({"megabytes": 16, "repeats": 2} if args.smoke else {}))
    print(f"memory bandwidth: copy {bandwidth['copy_gb_s']:.1f}, triad {bandwidth['triad_gb_s']:.1f}, "
          f"read {bandwidth['read_gb_s']:.1f} GB/s", flush=True)
    torch.set_num_threads(args.threads)
    model_config = json.loads((args.model / "config.json").read_text())
    text_config = model_config["text_config"]
    vision_config = model_config["vision_config"]
    with open(args.model / "model.safetensors", "rb") as f:  # page cache warm for whoever loads first
        while f.read(64 << 20):
            pass

    options = {"smolvlm": {"cpu_kernels": args.smolvlm_cpu_kernels}}
    if args.smolvlm_kv_cache_mb is not None:
        options["smolvlm"]["kv_cache_memory"] = args.smolvlm_kv_cache_mb << 20

    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "model": str(args.model),
        "model_shape": f"text {text_config['hidden_size']} x {text_config['num_hidden_layers']} layers, "
                       f"vision {vision_config['hidden_size']} x {vision_config['num_hidden_layers']} layers",
        "machine": machine,
        "bandwidth": bandwidth,
        "repeats": args.repeats,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        media = write_media(Path(tmp), args.scenarios)
        scenarios = make_scenarios(media, args.scenarios, "smoke" if args.smoke else "quick" if args.quick else "full")
        for dtype_name in args.dtypes:
            element_size = 2 if dtype_name == "bf16" else 4
            run = {"children": {f: [] for f in FRAMEWORKS}, "samples": {}, "peak_rss_mb": {}}
            report["runs"][dtype_name] = run
            for scenario in scenarios:
                run_scenario(scenario, dtype_name, args, media, options, run)
                if args.json:  # partial results survive an interrupted run
                    args.json.write_text(json.dumps(report, indent=1, default=str))
            weights = run["children"]["smolvlm"][0]["weight_bytes_per_token"]
            run["summary"] = summarise(run, weights, bandwidth["bandwidth_gb_s"], text_config, element_size, stop_tokens(args.model))
    report["machine"]["load_average_end"] = os.getloadavg()
    return report


def cpu_jiffies(pid: int | None = None) -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, or (own busy, 0) of process `pid` (user + system)."""
    if pid is not None:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]), 0
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15, window_s: float = 0.5) -> float:
    """Wait (at most `max_wait_s`) until the machine's CPU is < `threshold` busy over a short window
    (our children are idle then, so what is busy is someone else). Returns the seconds waited."""
    if max_wait_s <= 0:
        return 0.0
    start = time.perf_counter()
    while True:
        busy0, total0 = cpu_jiffies()
        time.sleep(window_s)
        busy1, total1 = cpu_jiffies()
        waited = time.perf_counter() - start
        if (busy1 - busy0) / max(1, total1 - total0) < threshold or waited >= max_wait_s:
            return waited


CONTENDED = 0.15  # others' share of the CPU above which a sample counts as disturbed


def run_sample(child: "Child", scenario: Scenario, dtype_name: str, repeat: int, args, run: dict) -> float:
    """One run of `scenario` in `child`; stores its samples in `run`; returns the others' CPU share."""
    waited = wait_for_quiet(args.quiet_wait)
    start = time.perf_counter()
    busy0, total0 = cpu_jiffies()
    own0, _ = cpu_jiffies(child.process.pid)
    out = child.run(scenario)
    busy1, total1 = cpu_jiffies()
    own1, _ = cpu_jiffies(child.process.pid)
    others = max(0, (busy1 - busy0) - (own1 - own0)) / max(1, total1 - total0)
    for name, sample in zip(scenario.report_names, out["samples"]):
        sample.update(repeat=repeat, others_cpu=others, load_average=os.getloadavg()[0], waited_for_quiet_s=waited)
        run["samples"].setdefault(name, {}).setdefault(child.framework, []).append(sample)
        run["peak_rss_mb"].setdefault(name, {}).setdefault(child.framework, []).append(out["peak_rss_mb"])
    print(f"[{dtype_name}] {scenario.name:8} repeat {repeat} {child.framework:12} {time.perf_counter() - start:7.1f} s "
          f"(others' CPU {others:4.0%})  {short_summary(out['samples'])}", flush=True)
    return others


def run_scenario(scenario: Scenario, dtype_name: str, args, media: dict[str, Path], options: dict, run: dict) -> None:
    """Fresh smolvlm and transformers children for this scenario, both alive, taking turns repeat by repeat.

    Fresh processes per scenario: each peak RSS belongs to this scenario alone, and every scenario adds
    one load-time sample per framework. Each sample also records `others_cpu`, the share of the machine's
    CPU time that went to processes other than the measured child while it ran (other users' jobs: on a
    2-core machine with 2 threads, any of it slows every parallel op down)."""
    children = {}
    try:
        for framework in FRAMEWORKS:  # one after the other (load times undisturbed), except in smoke runs
            children[framework] = Child(framework, dtype_name, args, media, options, wait=not args.smoke)
        for child in children.values():
            if child.info is None:
                child.info = child.receive("ready")
        repeats = min(args.repeats, scenario.max_repeats or args.repeats)
        for repeat in range(repeats):
            order = FRAMEWORKS if repeat % 2 == 0 else FRAMEWORKS[::-1]
            for framework in order:
                for attempt in range(1 + args.retries):  # run again while other jobs took the CPU
                    others = run_sample(children[framework], scenario, dtype_name, repeat, args, run)
                    if others <= CONTENDED:
                        break
    finally:
        for framework, child in children.items():
            try:
                info = dict(child.info, **child.close(), scenario=scenario.name)
                run["children"][framework].append(info)
                for name in scenario.report_names:
                    run.setdefault("ru_maxrss_mb", {}).setdefault(name, {})[framework] = info["ru_maxrss_mb"]
            except Exception as e:  # noqa: BLE001 - a child that died already said why
                print(f"closing {framework}: {e}", file=sys.stderr)
                child.process.kill()
    print(f"[{dtype_name}] {scenario.name:8} load smolvlm {children['smolvlm'].info['load_s']:.2f} s, "
          f"transformers {children['transformers'].info['load_s']:.2f} s", flush=True)


def short_summary(samples: list[dict]) -> str:
    parts = []
    for s in samples:
        if "batch_tok_s" in s:
            parts.append(f"batch {s['batch_tok_s']:.1f} tok/s")
        else:
            decode = f"{s['decode_tok_s']:.1f} tok/s" if s["decode_tok_s"] else "-"
            parts.append(f"ttft {s['ttft_s']:.2f} s (vision {s['vision_s']:.2f}), decode {decode}")
    return "; ".join(parts)


METRICS = ("preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tok_s", "batch_tok_s")


def same_answer(ours: list[int], theirs: list[int], stop_token_ids: set[int]) -> bool:
    """Greedy parity up to smolvlm's first stop token. Past it the runs differ by design: smolvlm
    (`ignore_eos`) emits the stop token and goes on, transformers (`min_new_tokens`) masks it and
    takes the next best token."""
    end = next((i for i, t in enumerate(ours) if t in stop_token_ids), len(ours))
    return ours[:end] == theirs[:end]


def summarise(run: dict, weight_bytes: int, bandwidth_gb_s: float, text_config: dict, element_size: int,
              stop_token_ids: set[int]) -> dict:
    summary = {}
    for name, by_framework in run["samples"].items():
        row = {}
        for framework, all_samples in by_framework.items():
            calm = [s for s in all_samples if s.get("others_cpu", 0) <= CONTENDED]
            samples = calm or [min(all_samples, key=lambda s: s.get("others_cpu", 0))]  # else the least disturbed
            medians = {m: median([s.get(m) for s in samples]) for m in METRICS}
            medians["peak_rss_mb"] = run.get("ru_maxrss_mb", {}).get(name, {}).get(framework)
            medians["others_cpu"] = max(s.get("others_cpu", 0) for s in samples)
            medians["samples_used"] = f"{len(samples)}/{len(all_samples)}"
            medians["prompt_tokens"] = samples[0].get("prompt_tokens")
            medians["cached_tokens"] = samples[-1].get("cached_tokens")
            row[framework] = medians
        ours, theirs = by_framework.get("smolvlm", []), by_framework.get("transformers", [])
        if ours and theirs:
            pairs = [(a["token_ids"], b["token_ids"]) for a in ours for b in theirs if a["repeat"] == b["repeat"]]
            if pairs and isinstance(pairs[0][0][0], list):  # a batch: one list per request
                pairs = [(x, y) for a, b in pairs for x, y in zip(a, b)]
            row["same_tokens"] = all(same_answer(a, b, stop_token_ids) for a, b in pairs)
        prompt = row.get("smolvlm", {}).get("prompt_tokens")
        new = ours[0]["new_tokens"] if ours else 0
        if prompt is not None and name != "batch8":
            context = prompt + new / 2  # mean context over the decode
            bytes_per_token = weight_bytes + kv_bytes_per_token(text_config, context, element_size)
            limit = bandwidth_gb_s * 1e9 / bytes_per_token
            row["decode_limit_tok_s"] = limit
            for framework in ("smolvlm", "transformers"):
                speed = row.get(framework, {}).get("decode_tok_s")
                if speed:
                    row[framework]["decode_fraction_of_limit"] = speed / limit
        summary[name] = row
    summary["_load"] = {f: median([c["load_s"] for c in run["children"][f]]) for f in run["children"]}
    summary["_weight_bytes_per_token"] = weight_bytes
    return summary


# =============================================================================================
# Markdown
# =============================================================================================


def fmt_pair(ours, theirs, unit: str, higher_is_better: bool) -> str:
    if ours is None or theirs is None or (ours == 0 and theirs == 0):
        return "-"
    digits = 1 if unit == "tok/s" or ours >= 10 else 2
    if (ours if higher_is_better else theirs) and not (theirs if higher_is_better else ours):
        return f"{ours:.{digits}f} / {theirs:.{digits}f} (skipped)"  # e.g. no vision: features were cached
    ratio = ours / theirs if higher_is_better else theirs / ours
    return f"{ours:.{digits}f} / {theirs:.{digits}f} (**{ratio:.2f}×**)"


def markdown(report: dict) -> str:
    m = report["machine"]
    b = report["bandwidth"]
    lines = [
        f"Machine: {m['cpu']} ({', '.join(m['isa']) or 'no AVX2'}), {m['logical_cpus']} logical CPUs, "
        f"{m['memory_gb']} GB RAM; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
        f"**{m['threads']} threads** on both sides. Load average {m['load_average_start'][0]:.2f} at the start, "
        f"{m.get('load_average_end', m['load_average_start'])[0]:.2f} at the end (the machine is shared).",
        f"Memory bandwidth ({b['buffer_mb']} MiB buffers): copy {b['copy_gb_s']:.1f} GB/s, scale-add {b['triad_gb_s']:.1f} GB/s, "
        f"read {b['read_gb_s']:.1f} GB/s; the decode limit below uses {b['bandwidth_gb_s']:.1f} GB/s.",
        f"Checkpoint: `{Path(report['model']).name}` ({report.get('model_shape', 'SmolVLM2-256M shape')}). Median of {report['repeats']} interleaved "
        f"repeat(s). Date {report['date']}. Command: `{report['command']}`.",
        "",
        "Each cell: smolvlm / transformers (**speed-up of smolvlm**: >1 is better for smolvlm; for memory, "
        "transformers' peak divided by ours). Times in seconds. Peak RSS: the scenario process's ru_maxrss. "
        "Others' CPU: the largest share of the machine's CPU that other users' processes took during one of "
        "the row's samples used for the medians. A sample during which other processes took more than 15% of "
        "the CPU is run again (--retries); medians use the undisturbed samples when there are any, else the "
        "least disturbed one (then that row is slowed, unevenly, by other users' jobs).",
    ]
    for dtype_name, run in report["runs"].items():
        s = run["summary"]
        load = s["_load"]
        lines += [
            "",
            f"### {dtype_name}",
            "",
            f"Load (checkpoint -> ready model and processor, median over the scenarios' processes): "
            f"{fmt_pair(load.get('smolvlm'), load.get('transformers'), 's', False)}. "
            f"Weights read per decoded token: {s['_weight_bytes_per_token'] / 1e6:.0f} MB. "
            f"smolvlm decode path: {run['children']['smolvlm'][0].get('decode_path', 'not recorded')}.",
            "",
            "| scenario | prompt tokens | preprocess | vision | prefill | TTFT | decode tok/s | decode / limit (ours, theirs) | peak RSS MiB | same tokens | others' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in s.items():
            if name.startswith("_"):
                continue
            ours, theirs = row.get("smolvlm", {}), row.get("transformers", {})
            if name == "batch8":
                decode = fmt_pair(ours.get("batch_tok_s"), theirs.get("batch_tok_s"), "tok/s", True) + " (aggregate)"
                limit = "-"
            else:
                decode = fmt_pair(ours.get("decode_tok_s"), theirs.get("decode_tok_s"), "tok/s", True)
                fo, ft = ours.get("decode_fraction_of_limit"), theirs.get("decode_fraction_of_limit")
                limit = f"{fo:.0%}, {ft:.0%} of {row['decode_limit_tok_s']:.0f}" if fo and ft else "-"
            prompt = ours.get("prompt_tokens")
            if ours.get("cached_tokens"):
                prompt = f"{prompt} ({ours['cached_tokens']} cached)"
            lines.append(
                f"| {name} | {prompt if prompt is not None else '-'} "
                f"| {fmt_pair(ours.get('preprocess_s'), theirs.get('preprocess_s'), 's', False)} "
                f"| {fmt_pair(ours.get('vision_s'), theirs.get('vision_s'), 's', False)} "
                f"| {fmt_pair(ours.get('prefill_s'), theirs.get('prefill_s'), 's', False)} "
                f"| {fmt_pair(ours.get('ttft_s'), theirs.get('ttft_s'), 's', False)} "
                f"| {decode} | {limit} "
                f"| {fmt_pair(ours.get('peak_rss_mb'), theirs.get('peak_rss_mb'), 'MiB', False)} "
                f"| {'yes' if row.get('same_tokens') else 'no'} "
                f"| {max(ours.get('others_cpu') or 0, theirs.get('others_cpu') or 0):.0%} |"
            )
    return "\n".join(lines) + "\n"


# =============================================================================================
# --profile: where smolvlm's time goes (no transformers involved)
# =============================================================================================


def profile_smolvlm(args) -> str:
    """torch.profiler (ops) and cProfile (Python functions) over one decode-heavy text answer and one
    photo's time to first token, smolvlm only, in this process. Returns a markdown-ready report."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtypes[0]])
    runner = SmolvlmRunner(args.model, dtype, {})
    sections = [f"smolvlm profile, {args.dtypes[0]}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}"]
    with tempfile.TemporaryDirectory() as tmp:
        media = write_media(Path(tmp), ["text", "photo"])  # the profile uses photos only
        runner.warm_up(media)
        cases = [
            ("text answer, 64 tokens (decode-heavy)", user(text(TEXT_QUESTIONS[0])), 64),
            ("photo, time to first token (17 tiles)", user({"type": "image", "path": str(media["astronaut"])}, text("Can you describe this image?")), 1),
        ]
        for title, conversation, n in cases:
            engine = runner.fresh_engine()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                metrics = runner.one_request(engine, conversation, n, {})
            ops = prof.key_averages(group_by_input_shape=False).table(sort_by="self_cpu_time_total", row_limit=12)
            engine = runner.fresh_engine()
            profiler = cProfile.Profile()
            profiler.enable()
            runner.one_request(engine, conversation, n, {})
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
            functions = "\n".join(line for line in stream.getvalue().splitlines() if line.strip())
            summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
            sections.append(f"## {title}\n{summary}\n\ntorch ops by self CPU time:\n{ops}\nPython functions by own time (cProfile):\n{functions}")
    return "\n\n".join(sections)


# =============================================================================================


def tiny_test_checkpoint() -> Path:
    """The test cache's tiny checkpoint (what tests/conftest.py builds), built with tools/make_checkpoints.py
    if missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_checkpoints", REPO_ROOT / "tools" / "make_checkpoints.py")
    builder = importlib.util.module_from_spec(spec)
    sys.modules["make_checkpoints"] = builder  # dataclasses look their module up while the file runs
    spec.loader.exec_module(builder)
    out = TEST_CACHE / f"tiny-v{builder.BUILDER_VERSION}"
    if not (out / "BUILDER_VERSION").is_file():
        builder.build_atomically("tiny", out)
    return out


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp32", "both"], default=None, help="default: both (smoke: fp32)")
    parser.add_argument("--scenarios", nargs="+", choices=ALL_SCENARIOS, default=None, help="default: all")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved repeats per scenario (video64 always runs once); 1 keeps the full run near 20 min here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint directory (default: the grafted test checkpoint; smoke: the tiny one)")
    parser.add_argument("--json", type=Path, default=None, help="write every raw sample and the medians here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--quick", action="store_true", help="short answers, text/photo/video12/batch8 (minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the tool in seconds: tiny test checkpoint, fp32, photo, 3-4 tokens, no quiet-wait, no retries")
    parser.add_argument("--smolvlm-kv-cache-mb", type=int, default=None, help="smolvlm KV-cache budget (default: the engine's)")
    parser.add_argument("--smolvlm-cpu-kernels", choices=["auto", "c", "torch"], default="auto",
                        help="smolvlm's CPU decode path (EngineConfig.cpu_kernels; default: the engine's, auto)")
    parser.add_argument("--retries", type=int, default=None,
                        help=f"run a sample again (up to this many times) when other processes took > {CONTENDED * 100:.0f}%% of the CPU (default 2; smoke: 0)")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="before each sample, wait up to this many seconds for other processes to leave the CPU idle "
                             "(default 20; smoke: 0, no wait)")
    parser.add_argument("--from-json", type=Path, default=None, help="measure nothing: re-summarise a saved --json report")
    parser.add_argument("--profile", type=Path, default=None,
                        help="instead of the comparison: profile smolvlm (first --dtype) and write the report to this file")
    args = parser.parse_args(argv)
    if args.from_json:
        return args
    if args.retries is None:
        args.retries = 0 if args.smoke else 2
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.smoke else 20.0
    if args.dtype is None:
        args.dtype = "fp32" if args.smoke else "both"
    if args.model is None:
        args.model = tiny_test_checkpoint() if args.smoke else DEFAULT_MODEL
    args.dtypes = ["bf16", "fp32"] if args.dtype == "both" else [args.dtype]
    if args.scenarios is None:
        args.scenarios = ["photo"] if args.smoke else ["text", "photo", "video12", "batch8"] if args.quick else list(ALL_SCENARIOS)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a checkpoint directory (no config.json); build one with "
                     f"`python tools/make_checkpoints.py grafted --out DIR`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))  # children (spawned) re-import this file; smolvlm from the checkout
    if args.profile:
        text_report = profile_smolvlm(args)
        args.profile.write_text(text_report)
        print(text_report)
        return 0
    report = rerender(args.from_json) if args.from_json else run_benchmark(args)
    table = markdown(report)
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(table)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
