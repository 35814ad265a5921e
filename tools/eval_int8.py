"""int8 mode against fp32: accuracy (logits, greedy answers) and speed (decode tok/s, peak memory).

    python tools/eval_int8.py                     # grafted 256M-shape checkpoint (real SmolLM2 decoder), CPU
    python tools/eval_int8.py --model DIR --prompts 16 --max-tokens 48
    python tools/eval_int8.py --smoke             # seconds: tiny checkpoint (numbers meaningless)

Accuracy, in this process: for each prompt, fp32's greedy answer (`Engine.generate`), then both
models teacher-forced on prompt + that answer (plain forwards): the logits' max and mean absolute
difference at the answer positions (with fp32's logit range for scale), how often int8's top token
equals fp32's there, and the KL divergence fp32 || int8. Then each engine's own greedy answer:
exact matches, and how many tokens agree before the first difference.
Speed, each mode in a fresh child process: decode tok/s over `--decode-tokens` forced tokens
(`ignore_eos`), best and median of `--rounds`, and the process's peak resident memory (VmHWM).
Prints markdown tables naming the CPU; `--json PATH` writes the numbers.

Beside llama.cpp's Q8_0 (`--llama-bin DIR --gguf-dir DIR`, the folders tools/bench_llamacpp.py uses):
the same text (`--corpus`, default docs/architecture.md, with < and > removed), cut into chunks of `--ctx` tokens, each
scored over its second half as `llama-perplexity --kl-divergence` does: KL(fp32 || int8) per token
and top-1 agreement for smolvlm (its int8 model against its fp32 one, plain forwards), and
llama-perplexity's "Mean KLD" and "Same top p" for Q8_0 against F32 (llama.cpp's own models, its
own tokenizer and chunking, a BOS in front of each chunk when the GGUF asks for one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ab import cpu_name  # noqa: E402 - a sibling script (standard library only at import)

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain why the sky is blue.",
    "Give me three tips for learning to cook.", "What is a prime number?", "Describe a cat to a child.",
    "How do airplanes stay in the air?", "Translate 'good morning' into Spanish.", "What causes rain?",
    "Name the planets of the solar system.", "Tell me a short story about a robot.", "What is photosynthesis?",
    "How many legs does a spider have?", "Why do we need sleep?", "What is the boiling point of water?",
    "Summarise the plot of Cinderella.",
]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(model: str, quantize: str | None, tokens: int, rounds: int) -> dict:
    """Decode speed and peak memory of one mode (runs in its own process)."""
    from smolvlm.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(model, quantize=quantize, max_model_len=2048)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    engine.generate([messages], SamplingParams(max_new_tokens=4))  # warm-up
    speeds = []
    for _ in range(rounds):
        (result,) = engine.generate([messages], SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        speeds.append((tokens - 1) / (result.total_time - result.time_to_first_token))  # decode steps only
    return {"quantize": quantize, "tok_s": speeds, "peak_rss_mb": peak_rss_mb()}


def accuracy(model: str, prompts: list[str], max_tokens: int) -> dict:
    import torch

    from smolvlm import SmolVLM
    from smolvlm.engine import Engine, SamplingParams

    engines = {q: Engine.from_pretrained(model, quantize=q, max_model_len=2048) for q in (None, "int8")}
    models = {None: SmolVLM.from_pretrained(model), "int8": SmolVLM.from_pretrained(model, quantize="int8")}
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(max_new_tokens=max_tokens)
    answers = {q: e.generate(conversations, params) for q, e in engines.items()}
    max_err, sum_err, count, top1, kl, scale = 0.0, 0.0, 0, 0, 0.0, 0.0
    exact, agree_prefix, lengths = 0, [], []
    for conversation, ref, got in zip(conversations, answers[None], answers["int8"]):
        prompt = engines[None].prepare(conversation).input_ids
        ids = torch.tensor([prompt + ref.token_ids])
        with torch.inference_mode():
            a = models[None](ids)[0, len(prompt) - 1 : -1].float()  # (answer, vocab): the logits that chose it
            b = models["int8"](ids)[0, len(prompt) - 1 : -1].float()
        diff = (a - b).abs()
        max_err = max(max_err, float(diff.max()))
        sum_err += float(diff.mean()) * a.shape[0]
        count += a.shape[0]
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        kl += float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                               reduction="sum"))
        scale = max(scale, float(a.abs().max()))
        exact += ref.token_ids == got.token_ids
        prefix = next((i for i, (x, y) in enumerate(zip(ref.token_ids, got.token_ids)) if x != y),
                      min(len(ref.token_ids), len(got.token_ids)))
        agree_prefix.append(prefix)
        lengths.append(len(ref.token_ids))
    return {"prompts": len(prompts), "positions": count, "logit_max_abs": max_err, "logit_mean_abs": sum_err / count,
            "logit_abs_max_fp32": scale, "top1_agreement": top1 / count, "kl_per_token": kl / count,
            "exact_answers": exact, "mean_agreeing_prefix": statistics.mean(agree_prefix),
            "mean_answer_tokens": statistics.mean(lengths)}


def text_kl(model: str, text: str, ctx: int) -> dict:
    """smolvlm's int8 against fp32 on `text` in chunks of `ctx` tokens, scored over each chunk's second half."""
    import torch

    from smolvlm import SmolVLM
    from smolvlm.processing import Processor

    ids = Processor.from_pretrained(model).tokenizer.encode(text, add_special_tokens=False)
    chunks = [ids[i : i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
    if not chunks:
        raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than --ctx {ctx}")
    models = {q: SmolVLM.from_pretrained(model, quantize=q) for q in (None, "int8")}
    kl, same, count = 0.0, 0, 0
    for chunk in chunks:
        with torch.inference_mode():
            a = models[None](torch.tensor([chunk]))[0, ctx // 2 : ctx - 1].float()  # (ctx/2 - 1, vocab)
            b = models["int8"](torch.tensor([chunk]))[0, ctx // 2 : ctx - 1].float()
        kl += float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"))
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        count += a.shape[0]
    return {"chunks": len(chunks), "positions": count, "kl_per_token": kl / count, "top1_agreement": same / count}


def llama_text_kl(bin_dir: Path, gguf_dir: Path, corpus: Path, ctx: int, threads: int) -> dict:
    """llama-perplexity's KL divergence of Q8_0 against F32 on the same corpus and chunk size."""
    import re
    import tempfile

    tool = bin_dir / "llama-perplexity"
    for path in (tool, gguf_dir / "text-f32.gguf", gguf_dir / "text-q8_0.gguf"):
        if not path.is_file():
            raise SystemExit(f"{path} not found (build llama-perplexity; make the GGUFs with tools/bench_llamacpp.py)")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "f32.kld"
        common = ["-f", str(corpus), "-c", str(ctx), "-t", str(threads), "--kl-divergence-base", str(base)]
        for model, extra in (("text-f32.gguf", []), ("text-q8_0.gguf", ["--kl-divergence"])):
            done = subprocess.run([str(tool), "-m", str(gguf_dir / model), *common, *extra], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"llama-perplexity failed on {model}:\n{done.stderr[-3000:]}")
    out = done.stdout + done.stderr
    kld = re.search(r"Mean\s+KLD:\s*([\d.eE+-]+)", out)
    same = re.search(r"Same top p:\s*([\d.]+)", out)
    if not (kld and same):
        raise SystemExit("llama-perplexity printed no 'Mean KLD' / 'Same top p':\n" + out[-3000:])
    return {"kl_per_token": float(kld.group(1)), "top1_agreement": float(same.group(1)) / 100}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the tests' grafted checkpoint)")
    parser.add_argument("--prompts", type=int, default=16, help=f"prompts for the accuracy (at most {len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy answer length (default 48)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="forced tokens per speed round (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds per process (default 5)")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per mode, interleaved (default 2)")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp build folder with llama-perplexity: Q8_0 beside int8")
    parser.add_argument("--gguf-dir", type=Path, help="the GGUF files of --model (text-f32.gguf, text-q8_0.gguf)")
    parser.add_argument("--corpus", type=Path, default=REPO / "docs" / "architecture.md", help="text for the KL comparison")
    parser.add_argument("--ctx", type=int, default=256, help="chunk length of the KL comparison (default 256)")
    parser.add_argument("--skip-speed", action="store_true", help="accuracy only")
    parser.add_argument("--smoke", action="store_true", help="tiny numbers, seconds (checks the script runs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.max_tokens, args.decode_tokens, args.rounds, args.processes = 2, 6, 8, 1, 1
    model = args.model or str(REPO / ".cache" / "test-checkpoints" / ("tiny-v1" if args.smoke else "grafted-v1"))
    if args.child is not None:
        print(json.dumps(child(model, None if args.child == "fp32" else args.child, args.decode_tokens, args.rounds)))
        return 0
    if not Path(model).is_dir():
        raise SystemExit(f"{model}: not a checkpoint directory (run the tests once to build it, or pass --model)")

    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for _ in range(0 if args.skip_speed else args.processes):  # interleaved: the host's drift hits both alike
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", model, "--decode-tokens",
                                  str(args.decode_tokens), "--rounds", str(args.rounds)],
                                 capture_output=True, text=True, check=True, cwd=REPO)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    acc = accuracy(model, PROMPTS[: args.prompts], args.max_tokens)

    import torch

    print(f"\nint8 vs fp32, {Path(model).name}, {cpu_name()}, {torch.get_num_threads()} threads\n")
    print("| mode | decode tok/s, best | median | peak RSS (MiB) |")
    print("|---|---|---|---|")
    speed = {}
    for mode, rs in (() if args.skip_speed else runs.items()):
        all_speeds = [s for r in rs for s in r["tok_s"]]
        speed[mode] = {"best": max(all_speeds), "median": statistics.median(all_speeds),
                       "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
        print(f"| {mode} | {speed[mode]['best']:.1f} | {speed[mode]['median']:.1f} | {speed[mode]['peak_rss_mb']:.0f} |")
    if speed:
        print(f"\nint8 / fp32 decode (medians): {speed['int8']['median'] / speed['fp32']['median']:.2f}x\n")
    print("| accuracy vs fp32 | value |")
    print("|---|---|")
    print(f"| logits max abs diff (fp32 logits up to {acc['logit_abs_max_fp32']:.1f}) | {acc['logit_max_abs']:.4f} |")
    print(f"| logits mean abs diff | {acc['logit_mean_abs']:.5f} |")
    print(f"| top-1 agreement, teacher-forced ({acc['positions']} positions) | {100 * acc['top1_agreement']:.2f} % |")
    print(f"| KL(fp32 || int8) per token | {acc['kl_per_token']:.2e} |")
    print(f"| greedy answers identical | {acc['exact_answers']} / {acc['prompts']} |")
    print(f"| tokens agreeing before the first difference (mean, of {acc['mean_answer_tokens']:.1f}) | "
          f"{acc['mean_agreeing_prefix']:.1f} |")
    side_by_side = None
    if args.llama_bin is not None:
        if args.gguf_dir is None:
            raise SystemExit("--llama-bin needs --gguf-dir")
        import re
        import tempfile

        # without < and >: the corpus then holds no special token (<image>...) for either tokenizer
        text = re.sub(r"[<>]", "", args.corpus.read_text())
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        try:
            ours = text_kl(model, text, args.ctx)
            theirs = llama_text_kl(args.llama_bin, args.gguf_dir, Path(f.name), args.ctx, torch.get_num_threads())
        finally:
            os.unlink(f.name)
        side_by_side = {"corpus": str(args.corpus), "ctx": args.ctx, "smolvlm_int8": ours, "llama_q8_0": theirs}
        print(f"\nSame text ({args.corpus.name}, chunks of {args.ctx} tokens, second halves scored):\n")
        print("| against its own fp32 / F32 | smolvlm int8 | llama.cpp Q8_0 |")
        print("|---|---|---|")
        print(f"| KL divergence per token | {ours['kl_per_token']:.2e} | {theirs['kl_per_token']:.2e} |")
        print(f"| top-1 agreement | {100 * ours['top1_agreement']:.2f} % | {100 * theirs['top1_agreement']:.2f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "model": model, "speed": speed, "runs": runs,
                                               "accuracy": acc, "side_by_side": side_by_side}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
