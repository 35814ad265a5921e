"""Decode-step matrix products on CPU: PyTorch's F.linear vs smolvlm_kernels.CpuKernels.

    python tools/bench_matvec.py [--threads 2] [--rows 1 2 4 8] [--layers 30]

One "token" = every weight matrix of the SmolVLM2-256M decoder's decode step, in model order (per layer
q/k/v fused 960x576, o 576x576, gate/up fused 3072x576, down 576x1536; then lm_head 49280x576), all
distinct tensors, so the weights stream from memory as in a real decode loop (a loop over one hot
matrix would measure the cache instead). Prints the median time per token, the weight bytes read per
second, and the speed-up, for each dtype and row count. Also checks the two agree.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matvec = CpuKernels.load()
    print(f"{args.threads} threads, {args.layers} layers + lm_head, median of {args.repeats} tokens")
    print(f"{'dtype':6} {'rows':>4} {'torch ms':>9} {'GB/s':>6} {'C ms':>8} {'GB/s':>6} {'speed-up':>8} {'max rel diff':>12}")
    for dtype in (torch.bfloat16, torch.float32):
        generator = torch.Generator().manual_seed(0)
        shapes = LAYER_SHAPES * args.layers + [LM_HEAD]
        weights = [(torch.randn(n, k, generator=generator) * k**-0.5).to(dtype) for n, k in shapes]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, generator=generator).to(dtype) for k in {k for _, k in shapes}}
            worst = max(
                ((matvec(xs[w.shape[1]], w).float() - F.linear(xs[w.shape[1]], w).float()).abs().max()
                 / F.linear(xs[w.shape[1]], w).float().abs().max()).item()
                for w in weights[:4] + weights[-1:]
            )
            t_torch = per_token_seconds([lambda w=w: F.linear(xs[w.shape[1]], w) for w in weights], args.repeats)
            t_c = per_token_seconds([lambda w=w: matvec(xs[w.shape[1]], w) for w in weights], args.repeats)
            name = str(dtype).removeprefix("torch.")
            print(
                f"{name:6} {rows:4d} {t_torch * 1e3:9.2f} {nbytes / t_torch / 1e9:6.1f} {t_c * 1e3:8.2f} "
                f"{nbytes / t_c / 1e9:6.1f} {t_torch / t_c:7.2f}x {worst:12.2e}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
