"""Side-by-side speed of two versions of smolvlm: this tree against a git revision, same run.

    python tools/bench_ab.py --against REV [--model DIR] [--rounds 5] [--prompt-tokens 512] [--new-tokens 64]
    python tools/bench_ab.py --smoke      # tiny checkpoint, 1 round, against HEAD

For a change that must not cost speed (e.g. issue 12's hook points: "without hooks, forward and
engine speed are unchanged"). REV is checked out into a temporary git worktree; each round runs one
child process per version, alternating A B A B (so machine noise hits both alike), each measuring:

    forward     `model(ids)` on a prompt of --prompt-tokens tokens, median of 3 (fp32, no hooks)
    engine      Engine.generate decode rate, --new-tokens tokens after that prompt (tokens/s)

Printed: the median over rounds of each, per version, and the ratio this/REV. --json writes them.
The Python package `smolvlm` comes from each tree (PYTHONPATH); the installed kernel packages
(`smolvlm_kernels`, `smolvlm_cpu_kernels`) are this environment's for both, so compare revisions
whose kernels/ agree, or rebuild.
Run it on an otherwise idle machine; the CPU model is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

CHILD = r"""
import json, statistics, sys, time, torch
from smolvlm import SmolVLM
from smolvlm.engine import Engine, SamplingParams, PromptInputs
model_dir, prompt_tokens, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_grad_enabled(False)
model = SmolVLM.from_pretrained(model_dir)
ids = torch.randint(100, 4000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
model(ids)
times = []
for _ in range(3):
    start = time.perf_counter(); model(ids); times.append(time.perf_counter() - start)
engine = Engine.from_pretrained(model_dir, enable_prefix_caching=False)
params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
engine.generate([PromptInputs(ids[0].tolist())], SamplingParams(max_new_tokens=4, ignore_eos=True))
[result] = engine.generate([PromptInputs(ids[0].tolist())], params)
decode_s = result.total_time - result.time_to_first_token
print(json.dumps({"forward_s": statistics.median(times), "decode_tok_s": (new_tokens - 1) / decode_s}))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(tree: Path, model: Path, prompt_tokens: int, new_tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(prompt_tokens), str(new_tokens)],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"the benchmark failed in {tree}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD", help="git revision to compare with (default: HEAD)")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the grafted test checkpoint)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint, 1 round, 32 + 8 tokens")
    args = parser.parse_args(argv)
    from bench_processor import default_processor_dir

    if args.smoke:
        args.rounds, args.prompt_tokens, args.new_tokens = 1, 32, 8
        args.model = args.model or default_processor_dir("tiny")
    args.model = args.model or default_processor_dir("grafted")
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "against"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), args.against], cwd=REPO_ROOT, check=True)
        try:
            samples = {"this tree": [], args.against: []}
            for round_index in range(args.rounds):
                for name, tree in (("this tree", REPO_ROOT), (args.against, worktree)):
                    samples[name].append(measure(tree, args.model, args.prompt_tokens, args.new_tokens))
                print(f"round {round_index + 1}/{args.rounds}: " + "  ".join(
                    f"{n}: forward {s[-1]['forward_s'] * 1000:.1f} ms, decode {s[-1]['decode_tok_s']:.1f} tok/s"
                    for n, s in samples.items()), file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO_ROOT, check=False)
    medians = {n: {k: statistics.median(s[k] for s in v) for k in ("forward_s", "decode_tok_s")} for n, v in samples.items()}
    a, b = medians["this tree"], medians[args.against]
    print(f"CPU: {cpu_name()}; model {args.model.name}; prompt {args.prompt_tokens} tokens; {args.new_tokens} new; "
          f"medians of {args.rounds} rounds")
    print(f"| version | forward ms | decode tok/s |\n|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m['forward_s'] * 1000:.1f} | {m['decode_tok_s']:.1f} |")
    print(f"| ratio this / {args.against} | {a['forward_s'] / b['forward_s']:.3f} | {a['decode_tok_s'] / b['decode_tok_s']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "against": args.against, "samples": samples,
                                         "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
