"""The `smolvlm` command: ask about images or a video from a terminal.

    smolvlm run [--model M] [--image P]... [--video P] "prompt"     stream one answer to stdout
    smolvlm chat [--model M] [--image P]... [--video P]             a conversation, one question per line
    smolvlm explain --image P "prompt" --out heat.png                where the answer looked (attention map)
    smolvlm finetune --model M --data train.jsonl --output DIR       LoRA (or full) fine-tuning
    smolvlm merge --model M --adapter DIR --output OUT               fold a LoRA adapter into a checkpoint
    smolvlm serve --model M [--port 8000]                            an OpenAI-compatible HTTP server

run, chat, explain and serve take --adapter DIR (a PEFT LoRA adapter, ours or one PEFT wrote).

Errors (a missing image, an unreadable video, a model that cannot be found) print one line to stderr
and exit with status 1; `--debug` shows the traceback instead. Heavy imports (torch, the model) wait
until the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"

DESCRIPTION = """\
SmolVLM2 on images and videos, from the terminal.

  smolvlm run --image photo.jpg "What is in this picture?"
  smolvlm run --video clip.mp4 --max-new-tokens 200 "Describe the video."
  smolvlm chat --image a.png --image b.png      (then type questions; /help inside)

The model is a local checkpoint directory or a Hugging Face hub id (default: %s), downloaded
once into the hub cache (HF_HOME) with a progress bar. Offline, point --model at a local
directory holding config.json, model.safetensors and the tokenizer/processor files.
""" % DEFAULT_MODEL

EPILOG = """\
examples:
  smolvlm run --image photo.jpg "What is in this picture?"
  smolvlm run --image a.png --image b.png "What differs between these images?"
  smolvlm run --video clip.mp4 --video-max-frames 16 "Describe the video."
  smolvlm run --model ./SmolVLM2-256M-Video-Instruct --dtype bfloat16 -t 0.7 --seed 1 "Tell me a joke."

The first run downloads the model into the Hugging Face cache (HF_HOME); offline, --model must
name a local checkpoint directory (config.json, model.safetensors, tokenizer and processor files).
Errors print one line and exit with status 1; --debug prints the traceback.
"""

CHAT_HELP = """\
Type a question and press Enter. Commands:
  /image PATH   attach an image to the next question
  /video PATH   attach a video to the next question
  /reset        start a new conversation (drops attached images and videos too)
  /exit         quit (or Ctrl-D)
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    model = common.add_argument_group("model")
    model.add_argument("--model", "-m", default=DEFAULT_MODEL,
                       help=f"checkpoint directory or hub repo id (default: {DEFAULT_MODEL})")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="weights and activations dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (auto: cuda when available)")
    model.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto",
                       help="paged attention implementation (auto: triton on CUDA, torch elsewhere)")
    model.add_argument("--cpu-kernels", choices=["auto", "c", "torch"], default="auto",
                       help="CPU decode steps: C kernels compiled at first use (c), plain PyTorch (torch), "
                            "or c when a C compiler is found (auto)")
    model.add_argument("--adapter", default=None, metavar="DIR",
                       help="a LoRA adapter directory (PEFT format: adapter_config.json + adapter_model.safetensors), "
                            "merged into the weights at load")
    model.add_argument("--quantize", choices=["int8"], default=None,
                       help="int8 decoder and LM head weights, a scale per 32 (faster decode on CPU, a little less "
                            "accurate: docs/benchmarks.md); default: the checkpoint's weights as they are")
    model.add_argument("--kv-cache-gb", type=float, default=None,
                       help="memory for the KV cache in GiB (default: 1 on CPU, half the free GPU memory)")

    media = common.add_argument_group("images and video")
    media.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                       help="an image file or URL; repeat for several images (shown before the prompt)")
    media.add_argument("--video", "-v", metavar="PATH", help="a video file (frames sampled at --video-fps)")
    media.add_argument("--no-image-splitting", action="store_true",
                       help="one tile per image instead of a grid of tiles + the whole image (fewer tokens)")
    media.add_argument("--video-fps", type=float, default=None, help="frames sampled per second (default: 1)")
    media.add_argument("--video-max-frames", type=int, default=None, help="at most this many frames (default: 64)")

    sampling = common.add_argument_group("generation")
    sampling.add_argument("--max-new-tokens", "-n", type=int, default=512, help="answer length limit (default: 512)")
    sampling.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    sampling.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop when the answer contains TEXT (repeatable)")

    misc = common.add_argument_group("output")
    misc.add_argument("--stats", action="store_true",
                      help="print timing and cache statistics to stderr after each answer")
    misc.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    parser = argparse.ArgumentParser(
        prog="smolvlm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,chat,explain,finetune,merge}")
    run = commands.add_parser("run", parents=[common], help="answer one prompt, streamed to stdout",
                              description="Answer one prompt about the given images / video, streamed to stdout.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("prompt", help="the question or instruction")
    commands.add_parser("chat", parents=[common], help="a conversation: one question per line on stdin",
                        description="A conversation: each line on stdin is a question; the answers stream to "
                                    "stdout. Earlier turns (and their images) stay cached.\n\n" + CHAT_HELP,
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    explain = commands.add_parser(
        "explain", parents=[common], help="answer, then draw where the answer looked in the image / video",
        description="Answer one prompt (greedy, through smolvlm.research: hooks honoured, no engine), then render "
                    "the attention from the answer tokens to the image tokens over the photo (tiles in the photo's "
                    "layout, the global thumbnail beside it) or over each sampled frame of the video (with a bar "
                    "of attention mass per frame).",
        epilog="examples:\n  smolvlm explain --image photo.jpg \"What is in this picture?\" --out heat.png\n"
               "  smolvlm explain --video clip.mp4 --layer 20 --head 3 \"What happens?\" --out frames.png\n"
               "  smolvlm explain --image doc.png --token 0 --logit-lens 5 \"What does it say?\" --out doc-heat.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("prompt", help="the question or instruction")
    explain.add_argument("--out", "-o", required=True, metavar="PNG", help="where to write the picture")
    explain.add_argument("--token", type=int, default=None, metavar="K",
                         help="attention from answer token K only (0 = the first); default: all answer tokens")
    explain.add_argument("--layer", type=int, default=None, help="one decoder layer (default: mean over layers)")
    explain.add_argument("--head", type=int, default=None, help="one attention head (default: mean over heads)")
    explain.add_argument("--logit-lens", type=int, default=0, metavar="K",
                         help="also print the top K next tokens read from every layer at the position that "
                              "predicted the first answer token (or --token)")
    add_finetune_parser(commands)
    add_serve_parser(commands)
    merge = commands.add_parser(
        "merge", help="fold a LoRA adapter into the weights: a checkpoint directory any tool loads",
        description="Load --model, add the --adapter's low-rank updates to the weights they target (W + alpha/r B A, "
                    "in fp32), and write a checkpoint directory (config, tokenizer and processor files copied) that "
                    "this project and transformers load like the original.")
    merge.add_argument("--model", "-m", required=True, help="the base checkpoint directory or hub repo id")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="the LoRA adapter directory")
    merge.add_argument("--output", "-o", required=True, metavar="OUT", help="where to write the merged checkpoint")
    merge.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="dtype of the written weights (default: float32)")
    merge.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def add_serve_parser(commands) -> None:
    s = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat completions, images and video, streaming)",
        description="Serve POST /v1/chat/completions (OpenAI's schema; image_url and vLLM's video_url parts; "
                    "stream: true for server-sent events), GET /v1/models, /health and /metrics (Prometheus). "
                    "One engine batches every client's requests. SIGTERM or Ctrl-C drains: requests in flight "
                    "finish, then the server exits (0 after SIGTERM, 130 after Ctrl-C; a second signal stops at once). Needs the serve extra: pip install \"smolvlm[serve]\".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = s.add_argument_group("model")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"checkpoint directory or hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients pass as `model` (default: the --model value)")
    g.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT LoRA adapter, merged at load")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (auto: cuda when available)")
    g.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto")
    g.add_argument("--cpu-kernels", choices=["auto", "c", "torch"], default="auto")
    g.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 decoder and LM head weights, a scale per 32 (docs/benchmarks.md has its accuracy)")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV-cache size (default: 1 GiB on CPU, half the free GPU memory)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length, prompt + answer (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together (default 32)")
    g = s.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed at start)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1/* (default: $SMOLVLM_API_KEY if set, else none)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests name local files (file:// or paths) under DIR; none otherwise")
    g.add_argument("--allowed-media-domains", default=None, metavar="HOST,HOST",
                   help="hosts that http(s) image and video URLs may name (default: any; set it when untrusted "
                        "clients can reach the server: it fetches what they name)")
    g.add_argument("--max-media-per-request", type=int, default=32, help="images + videos in one request (default 32)")
    g.add_argument("--max-request-bytes", type=int, default=100 * 1024 * 1024,
                   help="largest request body; more is a 413 (default 100 MiB)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait beyond --max-num-seqs; more get 503 + Retry-After (default 64)")
    g.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM, seconds requests in flight may take to finish (default 60)")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="debug also logs every request")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


# smolvlm.train.lora.DECODER_PROJECTIONS (not imported: --help must not load torch)
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_finetune_parser(commands) -> None:
    f = commands.add_parser(
        "finetune", help="fine-tune on JSONL conversations: LoRA adapters (PEFT format) or whole parts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune on conversations, one JSON object per line: {\"messages\": [...]} in the format "
                    "the processor takes (images, several images, videos; relative paths resolve against the file's "
                    "folder). The loss is on the assistant turns only. Every line is checked before training starts.\n\n"
                    "Output: a PEFT adapter directory (LoRA only), or a checkpoint directory (with --train), plus "
                    "metrics.jsonl, loss.png and checkpoint-STEP/ training states for --resume.",
        epilog="examples:\n"
               "  smolvlm finetune --model M --data train.jsonl --output out/ --epochs 3\n"
               "  smolvlm finetune --model M --data train.jsonl --eval-data val.jsonl --output out/ --steps 500 "
               "--save-every 100\n"
               "  smolvlm finetune --model M --data train.jsonl --output out/ --lora-rank 0 --train connector,decoder\n"
               "  smolvlm finetune ... --resume latest          (continue from the newest checkpoint-STEP in --output)\n"
               "  torchrun --nproc-per-node 2 -m smolvlm.cli finetune ...   (data-parallel, DDP)\n"
               "then: smolvlm run --model M --adapter out/ --image x.jpg \"...\"")
    f.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"base checkpoint (default: {DEFAULT_MODEL})")
    f.add_argument("--data", required=True, metavar="JSONL", help="training conversations")
    f.add_argument("--eval-data", default=None, metavar="JSONL", help="held-out conversations: loss at the end "
                   "(and every --eval-every steps)")
    f.add_argument("--output", "-o", required=True, metavar="DIR")
    g = f.add_argument_group("what trains")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (0: no adapters; default 8)")
    g.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha: the update is scaled by alpha/r (default 16)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-targets", default=",".join(DECODER_PROJECTIONS),
                   help="decoder projections that get adapters (default: all seven)")
    g.add_argument("--train", default="", metavar="PARTS",
                   help="parts trained in full, comma-separated: vision, connector, decoder (default: none)")
    g = f.add_argument_group("how long and how fast")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default: 1)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps, then cosine decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1)")
    g.add_argument("--batch-size", type=int, default=1, help="conversations per micro-batch per process (default 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype: bfloat16 runs under autocast, weights and optimizer stay fp32")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (auto: cuda when available)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass (less memory, ~30%% more time)")
    g.add_argument("--feature-cache-gb", type=float, default=1.0,
                   help="memory for image features reused across epochs while the vision tower is frozen (0: off)")
    g = f.add_argument_group("data")
    g.add_argument("--no-image-splitting", action="store_true", help="one tile per image (fewer tokens, less detail)")
    g.add_argument("--video-fps", type=float, default=None)
    g.add_argument("--video-max-frames", type=int, default=None)
    g.add_argument("--skip-bad-examples", action="store_true",
                   help="skip lines that cannot be used (reported) instead of stopping at the first")
    g = f.add_argument_group("bookkeeping")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=0, metavar="K", help="training state every K steps (0: at the end)")
    g.add_argument("--eval-every", type=int, default=0, metavar="K", help="evaluation every K steps (0: at the end)")
    g.add_argument("--resume", default=None, metavar="DIR|latest",
                   help="continue from a checkpoint-STEP directory, or the newest one under --output")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


class CLIError(Exception):
    """A problem to report in one line, without a traceback."""


def check_media(paths: list[str]) -> None:
    for path in paths:
        if "://" in path or path.startswith("data:"):
            continue
        if not Path(path).expanduser().is_file():
            raise CLIError(f"file not found: {path}")


def user_turn(text: str, images: list[str], video: str | None) -> dict:
    content = [{"type": "image", "url" if "://" in p else "path": p} for p in images]
    if video:
        content.append({"type": "video", "path": video})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def load_engine(args, **engine_options):
    import torch

    from smolvlm.engine import Engine

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    options = {"cpu_kernels": args.cpu_kernels, **{k: v for k, v in engine_options.items() if v is not None}}
    if args.kv_cache_gb is not None:  # checked by check_flags
        options["kv_cache_memory"] = int(args.kv_cache_gb * (1 << 30))
    return Engine.from_pretrained(
        args.model, dtype=getattr(torch, dtype_name), device=device, attention_backend=args.attention_backend,
        adapter=args.adapter, quantize=args.quantize, **options
    )


def sampling_params(args):
    from smolvlm.engine import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
        )
    except (TypeError, ValueError) as e:  # names the field: --max-new-tokens, --temperature, --top-p, ...
        raise CLIError(f"bad sampling flag: {e}") from None


def check_flags(args):
    """The flags' values, before the model loads (seconds, on CPU); returns the SamplingParams."""
    if args.kv_cache_gb is not None and not (math.isfinite(args.kv_cache_gb) and args.kv_cache_gb > 0):
        raise CLIError(f"--kv-cache-gb must be a positive number, got {args.kv_cache_gb}")
    if args.kv_cache_gb is not None and args.kv_cache_gb * (1 << 30) < (1 << 20):
        raise CLIError(f"--kv-cache-gb must be at least 0.001 (1 MiB), got {args.kv_cache_gb}")
    if args.video_fps is not None and not (math.isfinite(args.video_fps) and 0 < args.video_fps <= 1000):
        raise CLIError(f"--video-fps must be a number in (0, 1000], got {args.video_fps}")
    if args.video_max_frames is not None and not 1 <= args.video_max_frames <= 10_000:
        raise CLIError(f"--video-max-frames must be between 1 and 10000, got {args.video_max_frames}")
    if args.video and "://" in args.video:
        raise CLIError(f"--video takes a local file, not a URL: {args.video}")
    if args.adapter is not None and not (Path(args.adapter).expanduser() / "adapter_config.json").is_file():
        raise CLIError(f"--adapter {args.adapter}: not an adapter directory (no adapter_config.json)")
    check_device(args)
    return sampling_params(args)


def check_device(args) -> None:
    """--device and --attention-backend against this machine, before the model loads."""
    import torch

    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise CLIError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA devices")
        if device.type not in ("cpu", "cuda"):
            raise CLIError(f"--device {args.device}: only cpu and cuda are supported")
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if getattr(args, "attention_backend", "auto") == "triton" and not on_cuda:
        raise CLIError("--attention-backend triton runs on CUDA only; on CPU use auto or torch")


def processor_options(args) -> dict:
    options = {}
    if args.no_image_splitting:
        options["do_image_splitting"] = False
    if args.video_fps is not None:
        options["video_fps"] = args.video_fps
    if args.video_max_frames is not None:
        options["video_max_frames"] = args.video_max_frames
    return options


def answer(engine, messages, params, options, show_stats: bool) -> str:
    """Stream one answer to stdout; return its text."""
    import time

    before = engine.stats.prefill_tokens
    start = time.perf_counter()
    first = None
    pieces = []
    stream = engine.stream(messages, params, **options)
    try:
        for piece in stream:
            if first is None:
                first = time.perf_counter() - start
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except BaseException:
        if pieces:  # end the partial answer's line: the error (and the next answer) start on their own
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if show_stats:
        total = time.perf_counter() - start
        result = stream.result
        print(
            f"[{result.num_prompt_tokens} prompt tokens, {result.num_cached_tokens} from the prefix cache, "
            f"{engine.stats.prefill_tokens - before} prefilled; {len(result.token_ids)} new tokens; "
            f"first text after {first or total:.2f} s, total {total:.2f} s]",
            file=sys.stderr,
        )
    return "".join(pieces)


def run(args) -> int:
    check_media(args.image + ([args.video] if args.video else []))
    params = check_flags(args)
    engine = load_engine(args)
    answer(engine, [user_turn(args.prompt, args.image, args.video)], params, processor_options(args), args.stats)
    return 0


def chat(args) -> int:
    pending_images, pending_video = list(args.image), args.video
    check_media(pending_images + ([pending_video] if pending_video else []))
    params = check_flags(args)
    engine = load_engine(args)
    options = processor_options(args)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 becomes U+FFFD, never the end of the session
        sys.stdin.reconfigure(errors="replace")
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    messages: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            print(CHAT_HELP, file=sys.stderr)
            continue
        if command == "/reset":  # a new conversation: no history, no media waiting for the next question
            messages, pending_images, pending_video = [], [], None
            continue
        if command.startswith("/") and command not in ("/image", "/video"):
            print(f"error: unknown command {command} (/help lists them)", file=sys.stderr)
            continue
        if command in ("/image", "/video"):
            path = rest.strip()
            if not path:
                print(f"error: usage: {command} PATH", file=sys.stderr)
                continue
            try:
                check_media([path])
            except CLIError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            if command == "/image":
                pending_images.append(path)
            else:
                pending_video = path
            continue
        turn = user_turn(text, pending_images, pending_video)
        had_media = bool(pending_images or pending_video)
        pending_images, pending_video = [], None  # the media belong to this turn, whatever happens to it
        try:
            reply = answer(engine, messages + [turn], params, options, args.stats)
        except Exception as e:  # noqa: BLE001 - a bad image, a prompt over the context...: report, keep chatting
            if args.debug:
                raise
            dropped = " (its image/video was dropped; add it again with /image or /video)" if had_media else ""
            print(f"error: {describe(e)}{dropped}", file=sys.stderr)
            continue  # the conversation stays as it was before this turn
        messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": reply.strip()}]}]
    return 0


def explain(args) -> int:
    """Answer with smolvlm.research.generate, then draw the answer's attention on the image tokens."""
    media_paths = args.image + ([args.video] if args.video else [])
    if not media_paths:
        raise CLIError("explain needs an --image or a --video to draw the attention over")
    check_media(media_paths)
    check_flags(args)
    if args.temperature != 0:
        raise CLIError("explain answers greedily (what is studied, not sampled): drop --temperature")
    for flag in ("token", "layer", "head"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise CLIError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.logit_lens < 0:
        raise CLIError(f"--logit-lens must be >= 0, got {args.logit_lens}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must name a .png file, got {args.out}")
    if not out.parent.exists():
        raise CLIError(f"--out: directory {out.parent} does not exist")

    import torch
    from PIL import Image

    from smolvlm import SmolVLM
    from smolvlm.processing import Processor
    from smolvlm.research import attention_rows, generate, logit_lens, media_heat, render_image, render_video
    from smolvlm.weights import CHECKPOINT_PATTERNS, resolve_checkpoint

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    dtype = torch.float32 if args.dtype in ("auto", "float32") else getattr(torch, args.dtype)
    directory = resolve_checkpoint(args.model, allow_patterns=CHECKPOINT_PATTERNS)
    model = SmolVLM.from_pretrained(directory, dtype=dtype, device=device,
                                    quantize=None if args.adapter else args.quantize)
    if args.adapter:
        from smolvlm.train.lora import load_adapter, merge_lora

        load_adapter(model, args.adapter, dtype=torch.float32)
        merge_lora(model)
    if args.quantize and args.adapter:  # after merging (without an adapter: quantized at load)
        from smolvlm.quant import quantize_decoder

        quantize_decoder(model)
    processor = Processor.from_pretrained(directory if Path(args.model).expanduser().is_dir() else args.model)
    options = processor_options(args)
    text = model.config.text
    for flag, value, limit, what in (("layer", args.layer, text.num_hidden_layers, "layers"),
                                     ("head", args.head, text.num_attention_heads, "heads per layer")):
        if value is not None and value >= limit:
            raise CLIError(f"--{flag} {value}: this model has {limit} {what} (0..{limit - 1})")
    print("answering (one full forward pass per token)...", file=sys.stderr)
    result = generate(model, processor, [user_turn(args.prompt, args.image, args.video)], args.max_new_tokens, **options)
    print(result.text)
    if args.token is not None and args.token >= len(result.token_ids):
        raise CLIError(f"--token {args.token}: the answer has {len(result.token_ids)} tokens")
    rows = attention_rows(model, result, args.layer, args.head, args.token)
    positions = [i for i, t in enumerate(result.input_ids) if t == model.config.image_token_id]
    heats = media_heat(rows[positions], result.media, model.config.image_seq_len)
    what = "answer" if args.token is None else f"answer token {args.token} ({processor.decode([result.token_ids[args.token]])!r})"
    where = ("mean over layers" if args.layer is None else f"layer {args.layer}") + ", " + (
        "mean over heads" if args.head is None else f"head {args.head}")
    title = f"attention from the {what} to the image tokens ({where}); {sum(rows[positions]):.1%} of it on images"
    pictures = []
    images = iter(args.image)
    for heat in heats:
        if heat.kind == "image":
            pictures.append(render_image(heat, _open_photo(next(images)), title))
        else:
            pictures.append(render_video(heat, _video_frames(args.video, processor, options), title))
    canvas = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for picture in pictures:
        canvas.paste(picture, (0, y))
        y += picture.height
    canvas.save(out)
    print(f"wrote {out} ({title})", file=sys.stderr)
    if args.logit_lens:
        position = len(result.input_ids) - 1 + (args.token or 0)
        print(f"logit lens at position {position} (predicting answer token {args.token or 0}):")
        for layer, top in logit_lens(model, result.sequence, position, args.logit_lens, result.pixel_values):
            print(f"  layer {layer:2d}: " + "  ".join(f"{processor.decode([t])!r} {p:.3f}" for t, p in top))
    return 0


def _open_photo(path: str):
    from smolvlm.processing.image import load_image

    return load_image({"type": "image", "url" if "://" in path else "path": path})


def _video_frames(path: str, processor, options: dict):
    from PIL import Image

    from smolvlm.processing.video import load_video

    settings = processor.config.with_overrides(None, None, options.get("video_fps"), options.get("video_max_frames")).video
    clip = load_video(path, settings, backend=processor.video_backend)
    return [Image.fromarray(frame) for frame in clip.frames]


def finetune(args) -> int:
    import torch

    from smolvlm.train.train import FinetuneConfig, finetune as run_finetune

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    config = FinetuneConfig(
        model=args.model, data=args.data, eval_data=args.eval_data, output=args.output,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        train=tuple(t.strip() for t in args.train.split(",") if t.strip()),
        steps=args.steps, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        max_grad_norm=args.max_grad_norm or None, batch_size=args.batch_size, grad_accum=args.grad_accum,
        dtype=args.dtype, device=device, gradient_checkpointing=args.gradient_checkpointing,
        feature_cache_gb=args.feature_cache_gb, do_image_splitting=False if args.no_image_splitting else None,
        video_fps=args.video_fps, video_max_frames=args.video_max_frames, skip_bad_examples=args.skip_bad_examples,
        seed=args.seed, save_every=args.save_every, eval_every=args.eval_every, resume=args.resume,
        progress=not args.no_progress,
    )
    try:
        config.check()
    except ValueError as e:
        raise CLIError(str(e)) from None
    result = run_finetune(config)
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    evaluation = f", eval loss {result.eval_losses[-1][1]:.4f}" if result.eval_losses else ""
    skipped = f", {len(result.skipped)} bad examples skipped" if result.skipped else ""
    what = "adapter" if result.kind == "adapter" else "checkpoint"
    print(f"{result.steps} steps, final loss {last}{evaluation}{skipped}; {what} written to {result.output} "
          f"(metrics.jsonl, loss.png)", file=sys.stderr)
    return 0


def merge(args) -> int:
    import torch

    from smolvlm.model import SmolVLM
    from smolvlm.train.checkpoint import save_model_dir
    from smolvlm.train.lora import load_adapter, merge_lora
    from smolvlm.weights import resolve_checkpoint

    if Path(args.output).expanduser().resolve() == Path(args.model).expanduser().resolve():
        raise CLIError("--output must differ from --model (the base checkpoint is not overwritten)")
    out = Path(args.output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"--output {args.output} exists and is not empty (nothing is overwritten)")
    directory = resolve_checkpoint(args.model)
    model = SmolVLM.from_pretrained(directory, dtype=torch.float32)
    load_adapter(model, args.adapter)
    count = merge_lora(model)
    save_model_dir(model, directory, args.output, dtype=getattr(torch, args.dtype))
    print(f"merged {count} LoRA projections into {args.output}", file=sys.stderr)
    return 0


def serve(args) -> int:
    try:
        import smolvlm.serve.app  # noqa: F401 - its dependencies, before the model loads
    except ImportError as e:
        raise CLIError(f'smolvlm serve needs the serve extra ({e.name} is missing): pip install "smolvlm[serve]"') from None
    from smolvlm.serve import serve as run_server
    from smolvlm.serve.app import ServerConfig

    for name, low in (("max_num_seqs", 1), ("max_request_bytes", 1), ("max_queue", 0), ("max_media_per_request", 1)):
        if getattr(args, name) < low:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise CLIError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if not (math.isfinite(args.drain_timeout) and args.drain_timeout >= 0):
        raise CLIError(f"--drain-timeout must be a number >= 0, got {args.drain_timeout}")
    media = args.allowed_local_media_path
    if media is not None and not Path(media).expanduser().is_dir():
        raise CLIError(f"--allowed-local-media-path {media}: not a directory")
    api_key = args.api_key if args.api_key is not None else os.environ.get("SMOLVLM_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise CLIError("--api-key must not be empty")
    if args.kv_cache_gb is not None and not (math.isfinite(args.kv_cache_gb) and args.kv_cache_gb * (1 << 30) >= (1 << 20)):
        raise CLIError(f"--kv-cache-gb must be at least 0.001 (1 MiB), got {args.kv_cache_gb}")
    if args.adapter is not None and not (Path(args.adapter).expanduser() / "adapter_config.json").is_file():
        raise CLIError(f"--adapter {args.adapter}: not an adapter directory (no adapter_config.json)")
    check_device(args)
    config = ServerConfig(
        model_name=args.served_model_name or args.model, api_key=api_key,
        allowed_local_media_path=None if media is None else Path(media).expanduser(),
        max_request_bytes=args.max_request_bytes, max_waiting=args.max_queue,
        max_media_per_request=args.max_media_per_request,
        allowed_media_domains=None if args.allowed_media_domains is None
        else tuple(d.strip() for d in args.allowed_media_domains.split(",") if d.strip()),
    )
    engine = load_engine(args, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    return run_server(engine, config, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                      log_level=args.log_level)


COMMANDS = {"run": run, "chat": chat, "explain": explain, "finetune": finetune, "merge": merge, "serve": serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # `smolvlm run ... | head`
        return 0
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug for the traceback
        if args.debug:
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1


def describe(error: Exception) -> str:
    message = str(error) or type(error).__name__
    name = type(error).__name__
    if name == "CheckpointError":
        return f"{message}\n  (use --model /path/to/checkpoint-directory to run a local copy)"
    if name in ("CLIError", "ProcessorError", "RequestError", "ConfigError", "DataError", "AdapterError", "ResumeError"):
        return message
    return f"{name}: {message}"


if __name__ == "__main__":
    sys.exit(main())
