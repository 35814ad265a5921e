"""Decode-step matrix products on CPU: PyTorch's F.linear vs smolvlm_kernels.CpuKernels.

    python tools/bench_matvec.py [--threads 2] [--rows 1 2 4 8] [--layers 30] [--json out.json]
    python tools/bench_matvec.py --smoke    # seconds: 1 layer, a 1024-row lm_head, rows 1 2, 3 repeats

One "token" = every weight matrix of the SmolVLM2-256M decoder's decode step, in model order (per layer
q/k/v fused 960x576, o 576x576, gate/up fused 3072x576, down 576x1536; then lm_head 49280x576), all
distinct tensors, so the weights stream from memory as in a real decode loop (a loop over one hot
matrix would measure the cache instead). Prints the median time per token, the weight bytes read per
second, and the speed-up, for each dtype and row count. Also checks the two agree: the script fails when
the largest difference, relative to the largest output, exceeds 2e-2 (bf16) or 1e-4 (fp32).

Smoke mode (--smoke): the same measurement on tiny shapes, to check the tool and the C kernels work
(numbers meaningless); explicit --rows / --layers / --repeats still apply. --json writes the rows
({"threads", "layers", "lm_head", "repeats", "rows": [{"dtype", "rows", "torch_ms", "torch_gb_s", "c_ms",
"c_gb_s", "speedup", "max_rel_diff"}]}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smolvlm_cpu_kernels import CpuKernels  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) per decoder layer
LM_HEAD = (49280, 576)
SMOKE_LM_HEAD = (1024, 576)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # max |C - torch| / max |torch|


def per_token_seconds(fns, repeats: int) -> float:
    for _ in range(3):  # warm up
        for fn in fns:
            fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for fn in fns:
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="default: 1 2 4 8 (smoke: 1 2)")
    parser.add_argument("--layers", type=int, default=None, help="default: 30 (smoke: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 15 (smoke: 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few repeats: checks the tool runs (seconds)")
    args = parser.parse_args(argv)
    rows_list = args.rows or ([1, 2] if args.smoke else [1, 2, 4, 8])
    layers = args.layers if args.layers is not None else (1 if args.smoke else 30)
    repeats = args.repeats if args.repeats is not None else (3 if args.smoke else 15)
    lm_head = SMOKE_LM_HEAD if args.smoke else LM_HEAD
    torch.set_num_threads(args.threads)
    matvec = CpuKernels.load().matvec
    print(f"{args.threads} threads, {layers} layers + lm_head {lm_head[0]}x{lm_head[1]}, median of {repeats} tokens")
    print(f"{'dtype':6} {'rows':>4} {'torch ms':>9} {'GB/s':>6} {'C ms':>8} {'GB/s':>6} {'speed-up':>8} {'max rel diff':>12}")
    report = {"threads": args.threads, "layers": layers, "lm_head": list(lm_head), "repeats": repeats, "rows": []}
    failures = []
    for dtype in (torch.bfloat16, torch.float32):
        generator = torch.Generator().manual_seed(0)
        shapes = LAYER_SHAPES * layers + [lm_head]
        weights = [(torch.randn(n, k, generator=generator) * k**-0.5).to(dtype) for n, k in shapes]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        for rows in rows_list:
            xs = {k: torch.randn(rows, k, generator=generator).to(dtype) for k in {k for _, k in shapes}}
            worst = max(
                ((matvec(xs[w.shape[1]], w).float() - F.linear(xs[w.shape[1]], w).float()).abs().max()
                 / F.linear(xs[w.shape[1]], w).float().abs().max()).item()
                for w in weights[:4] + weights[-1:]
            )
            t_torch = per_token_seconds([lambda w=w: F.linear(xs[w.shape[1]], w) for w in weights], repeats)
            t_c = per_token_seconds([lambda w=w: matvec(xs[w.shape[1]], w) for w in weights], repeats)
            name = str(dtype).removeprefix("torch.")
            print(
                f"{name:6} {rows:4d} {t_torch * 1e3:9.2f} {nbytes / t_torch / 1e9:6.1f} {t_c * 1e3:8.2f} "
                f"{nbytes / t_c / 1e9:6.1f} {t_torch / t_c:7.2f}x {worst:12.2e}",
                flush=True,
            )
            report["rows"].append({
                "dtype": name, "rows": rows, "torch_ms": t_torch * 1e3, "torch_gb_s": nbytes / t_torch / 1e9,
                "c_ms": t_c * 1e3, "c_gb_s": nbytes / t_c / 1e9, "speedup": t_torch / t_c, "max_rel_diff": worst,
            })
            if not worst <= TOLERANCE[dtype]:  # also catches NaN
                failures.append(f"{name} rows={rows}: max rel diff {worst:.2e} > {TOLERANCE[dtype]:.0e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if failures:
        print("C kernels disagree with F.linear: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
