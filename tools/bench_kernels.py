"""Benchmark the Triton kernels (smolvlm_kernels) against torch SDPA on SmolVLM2-256M's real shapes.

    python tools/bench_kernels.py                 # all kernels, fp16 and bf16, prints a markdown table
    python tools/bench_kernels.py --sweep         # also sweep tile configs / split counts
    python tools/bench_kernels.py --json out.json # full numbers
    python tools/bench_kernels.py --smoke         # CPU ok (seconds): one case per kernel variant, tiny
                                                  # shapes, one call each under TRITON_INTERPRET, bf16,
                                                  # each checked against the reference (--dry-run: same)

Shapes (REFERENCE.md section 1): vision tower 12 heads x 64, 1,024 patches per tile (17 tiles for
one split image, 64 for a video); decoder 9 query heads sharing 3 KV heads of 64; a 64-frame
video is ~4,500 tokens of context. Every case first checks its output against the torch reference.

Rates: attention TFLOP/s counts 4 * D flops per (query, visible key) pair per head (QK^T and PV);
bandwidth counts each byte the kernel must move once (K/V context read, q read, output written).
Ceilings are measured on the card itself: a 1 GiB device-to-device copy and an 8192^3 matmul.
For SDPA each backend (flash, efficient, cudnn) is timed separately on its native [B, H, T, D]
layout; "sdpa best" is the fastest that runs. flash-attn is added when it is installed.

Smoke mode (--smoke, alias --dry-run): no baselines, no ceilings, no GPU needed; on a machine without CUDA
the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here when no GPU is seen). Its times are
one call each (meaningless, interpreter included); what it checks is that every kernel runs and agrees with
the reference. --json writes {"machine": {...}, "results": [{"kernel", "case", "dtype", "ms", "tflops",
"gbps", "baselines", "note"}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import smolvlm_kernels as K  # noqa: E402
from smolvlm_kernels import reference as R  # noqa: E402
from smolvlm_kernels.tile_config import TileConfig, decode_config, prefill_config  # noqa: E402

HEAD_DIM = 64
SCALE = HEAD_DIM**-0.5


@dataclass
class Result:
    kernel: str
    case: str
    dtype: str
    ms: float
    tflops: float | None = None
    gbps: float | None = None
    baselines: dict = field(default_factory=dict)  # name -> ms
    note: str = ""


# ------------------------------------------------------------------------------------------ timing


def bench(fn, dry_run: bool) -> float:
    """Median milliseconds of fn() on the GPU; one call when dry.

    Timed as replays of a captured CUDA graph (triton.testing.do_bench_cudagraph): a decode step is
    a few microseconds of GPU work, less than Python's launch overhead, and an engine replays
    graphs anyway. Falls back to eager launches timed with CUDA events if capture fails."""
    if dry_run:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as error:  # noqa: BLE001 - any capture failure: time eagerly instead
        print(f"  (graph capture failed, eager timing: {str(error).splitlines()[0][:100]})", file=sys.stderr)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def sdpa_backends(run, args) -> dict[str, float]:
    """Time `run()` (a torch SDPA call) under each SDPA backend that accepts it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if args.dry_run or args.skip_baselines:
        return {}
    times = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                run()
                torch.cuda.synchronize()
                times[f"sdpa-{name}"] = bench(run, False)
        except RuntimeError as error:  # backend does not support this input
            times[f"sdpa-{name}"] = None
            print(f"  (sdpa {name}: {str(error).splitlines()[0][:100]})", file=sys.stderr)
    return times


def flash_attn_varlen(args):
    """flash-attn's own `flash_attn_varlen_func` (a baseline from another library), or None."""
    if args.dry_run or args.skip_baselines:
        return None
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return None
    return flash_attn_varlen_func


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 2e-5 if out.dtype == torch.float32 else (4e-3 if out.dtype == torch.float16 else 3.2e-2)
    diff = (out.float() - ref.float()).abs()
    bad = diff > tol + tol * ref.float().abs()
    if bad.any() or out.float().isnan().any():
        raise AssertionError(f"{name}: wrong output, max abs diff {diff.max().item():.3g} (tolerance {tol})")


def checked_ms(name: str, run, reference, dry_run: bool) -> float:
    """Check `run()` against `reference()`, then time it (`bench`); when dry, the checked call is the timed one
    (under the interpreter each call takes up to a second)."""
    if not dry_run:
        check(name, run(), reference())
        return bench(run, False)
    start = time.perf_counter()
    out = run()
    ms = (time.perf_counter() - start) * 1e3
    check(name, out, reference())
    return ms


def causal_pairs(q_len: int, k_len: int) -> int:
    """(query, key) pairs visible under bottom-right causal masking."""
    return sum(min(k_len, i + 1 + k_len - q_len) for i in range(q_len))


def cu(lengths, device):
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def contiguous_tables(context_lens, block_size, device, shuffle=True):
    """Block tables over a pool sized to fit all sequences; blocks shuffled like a long-running engine's."""
    counts = [-(-n // block_size) for n in context_lens]
    total = sum(counts)
    order = torch.randperm(total) if shuffle else torch.arange(total)
    table = torch.zeros(len(context_lens), max(counts), dtype=torch.int32)
    used = 0
    for b, count in enumerate(counts):
        table[b, :count] = order[used : used + count]
        used += count
    return table.to(device), total


# ------------------------------------------------------------------------------------------ cases


def bench_masked(dtype, batch, padded, config, args) -> Result:
    """Vision tower: [B, 1024, 12, 64], bidirectional, optional key padding (a 20 x 27-patch image)."""
    seq, heads = (1024, 12) if not args.dry_run else (40, 2)
    device = args.device
    q, k, v = (torch.randn(batch, seq, heads, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    mask = None
    if padded:
        grid = int(seq**0.5)
        valid = torch.zeros(batch, grid, grid, dtype=torch.bool, device=device)
        valid[:, : grid * 5 // 8, : grid * 27 // 32] = True
        mask = torch.nn.functional.pad(valid.view(batch, -1), (0, seq - grid * grid))
    run = lambda: K.masked_attention(q, k, v, mask, scale=SCALE, config=config)  # noqa: E731
    ms = checked_ms("masked", run, lambda: R.reference_masked_attention(q, k, v, mask, scale=SCALE), args.dry_run)
    flops = 4 * batch * heads * seq * seq * HEAD_DIM

    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's native [B, H, T, D]
    attn_mask = None if mask is None else mask[:, None, None, :]
    baselines = sdpa_backends(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=SCALE), args)
    return Result("masked_attention", f"vision B={batch} T={seq} H={heads}" + (" padded" if padded else ""), str(dtype), ms, tflops=flops / ms / 1e9, baselines=baselines)


def bench_paged_prefill(dtype, batch, new_tokens, context, block_size, config, args) -> Result:
    """Chunked / prefix-cached prefill: `new_tokens` queries per sequence over `context` cached tokens."""
    if args.dry_run:
        batch, new_tokens, context = 2, 20, 45
    device = args.device
    q_heads, kv_heads = 9, 3
    tables, num_blocks = contiguous_tables([context] * batch, block_size, device)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(batch * new_tokens, q_heads, HEAD_DIM, device=device, dtype=dtype)
    cu_q = cu([new_tokens] * batch, device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    run = lambda: K.paged_prefill_attention(q, k_cache, v_cache, tables, cu_q, seq_lens, new_tokens, scale=SCALE, config=config)  # noqa: E731
    ms = checked_ms("paged prefill", run, lambda: R.reference_paged_prefill_attention(q, k_cache, v_cache, tables, cu_q, seq_lens, scale=SCALE), args.dry_run)
    flops = 4 * q_heads * HEAD_DIM * batch * causal_pairs(new_tokens, context)

    baselines = {}
    fa = flash_attn_varlen(args)
    if fa is not None:  # flash-attn over the same K/V held contiguously (what paging costs)
        k = torch.stack([R.gather_paged(k_cache, tables[b], context) for b in range(batch)]).view(-1, kv_heads, HEAD_DIM)
        v = torch.stack([R.gather_paged(v_cache, tables[b], context) for b in range(batch)]).view(-1, kv_heads, HEAD_DIM)
        cu_k = cu([context] * batch, device)
        baselines["flash-attn"] = bench(lambda: fa(q, k, v, cu_q, cu_k, new_tokens, context, causal=True, softmax_scale=SCALE), False)
    return Result("paged_prefill_attention", f"B={batch} new={new_tokens} ctx={context} block={block_size}", str(dtype), ms, tflops=flops / ms / 1e9, baselines=baselines)


def bench_decode(dtype, batch, context, block_size, num_splits, config, args, copy_gbps=None) -> Result:
    """One token per sequence over `context` cached tokens; bandwidth-bound."""
    if args.dry_run:
        batch, context = min(batch, 3), 70
    device = args.device
    q_heads, kv_heads = 9, 3
    tables, num_blocks = contiguous_tables([context] * batch, block_size, device)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(batch, q_heads, HEAD_DIM, device=device, dtype=dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    run = lambda: K.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE, num_splits=num_splits, config=config)  # noqa: E731
    ms = checked_ms("decode", run, lambda: R.reference_paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE), args.dry_run)
    element = q.element_size()
    moved = 2 * batch * context * kv_heads * HEAD_DIM * element + 2 * q.numel() * element + tables.numel() * 4
    gbps = moved / ms / 1e6

    kt = torch.stack([R.gather_paged(k_cache, tables[b], context) for b in range(batch)]).transpose(1, 2).contiguous()  # [B, Hkv, ctx, D]
    vt = torch.stack([R.gather_paged(v_cache, tables[b], context) for b in range(batch)]).transpose(1, 2).contiguous()
    qt = q[:, :, None, :]  # [B, Hq, 1, D]
    baselines = sdpa_backends(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=SCALE, enable_gqa=True), args)
    splits = num_splits if num_splits is not None else "auto"
    note = f"{100 * gbps / copy_gbps:.0f}% of copy bandwidth" if copy_gbps else ""
    return Result("paged_decode_attention", f"B={batch} ctx={context} block={block_size} splits={splits}", str(dtype), ms, gbps=gbps, baselines=baselines, note=note)


def bench_store(dtype, tokens, args, copy_gbps=None) -> Result:
    if args.dry_run:
        tokens = 40
    device = args.device
    kv_heads, block_size = 3, 16
    num_blocks = 2 * tokens // block_size + 4
    k_cache, v_cache = (torch.zeros(num_blocks, block_size, kv_heads, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
    key, value = (torch.randn(tokens, kv_heads, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens].to(torch.int32)
    run = lambda: K.store_kv(key, value, k_cache, v_cache, slots)  # noqa: E731
    run()
    if not torch.equal(k_cache.view(-1, kv_heads, HEAD_DIM)[slots.long()], key):
        raise AssertionError("store_kv wrote wrong values")
    ms = bench(run, args.dry_run)
    gbps = 4 * key.numel() * key.element_size() / ms / 1e6  # read key+value, write both

    def torch_store():
        k_cache.view(-1, kv_heads, HEAD_DIM)[slots.long()] = key
        v_cache.view(-1, kv_heads, HEAD_DIM)[slots.long()] = value

    baselines = {"torch-index-put": bench(torch_store, args.dry_run)}
    return Result("store_kv", f"N={tokens} tokens, 3 kv heads", str(dtype), ms, gbps=gbps, baselines=baselines)


def ceilings(args) -> dict:
    if args.dry_run:
        return {}
    x = torch.empty(2**30, dtype=torch.uint8, device=args.device)
    y = torch.empty_like(x)
    import triton.testing

    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")  # one big launch: events suffice
    a = torch.randn(8192, 8192, device=args.device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=args.device, dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ b, False)
    del x, y, a, b
    return {"copy_gbps": 2 * 2**30 / copy_ms / 1e6, "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


# ------------------------------------------------------------------------------------------ sweeps


PREFILL_CONFIGS = [
    TileConfig(128, 64, 4, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3), TileConfig(128, 128, 4, 2),
    TileConfig(128, 64, 4, 4), TileConfig(64, 64, 4, 3), TileConfig(128, 32, 4, 3),
]
DECODE_CONFIGS = [TileConfig(16, 32, 4, 3), TileConfig(16, 64, 4, 3), TileConfig(16, 64, 4, 4), TileConfig(16, 128, 4, 3), TileConfig(16, 128, 8, 3)]


def sweep(args, results, dtype) -> tuple[TileConfig | None, TileConfig | None]:
    """Time each prefill config on the vision (B=64) and causal decoder prefill (paged prefill of 16
    fresh sequences x 1024 tokens) cases, and each decode config x split count at batch 64 x 4k;
    return the best prefill and decode configs (prefill: least total time over both cases)."""
    args.skip_baselines = True  # configs are compared with each other
    prefill_totals = {}
    for config in PREFILL_CONFIGS:
        total = 0.0
        for case in (lambda c: bench_masked(dtype, 64, False, c, args), lambda c: bench_paged_prefill(dtype, 16, 1024, 1024, 16, c, args)):
            try:
                r = case(config)
            except Exception as error:  # noqa: BLE001 - a config can exceed shared memory
                print(f"  config {config}: {type(error).__name__}: {str(error)[:120]}", file=sys.stderr)
                total = float("inf")
                continue
            r.note = f"sweep {asdict(config)}"
            results.append(r)
            total += r.ms
            print(f"sweep {r.kernel:24s} {r.case:45s} {r.dtype} {config} {r.ms:.4f} ms {r.tflops:.0f} TFLOP/s", flush=True)
        prefill_totals[config] = total
    decode_times = {}
    for config in DECODE_CONFIGS:
        for splits in (1, 2, 3, 4, 6, 8, 12, 16):
            try:
                r = bench_decode(dtype, 64, 4096, 16, splits, config, args)
            except Exception as error:  # noqa: BLE001
                print(f"  decode config {config} splits {splits}: {type(error).__name__}: {str(error)[:120]}", file=sys.stderr)
                continue
            r.note = f"sweep {asdict(config)}"
            results.append(r)
            decode_times[config] = min(decode_times.get(config, float("inf")), r.ms)
            print(f"sweep {r.kernel:24s} {r.case:45s} {r.dtype} {config} {r.ms:.4f} ms {r.gbps:.0f} GB/s", flush=True)
    args.skip_baselines = False
    best_prefill = min(prefill_totals, key=prefill_totals.get) if prefill_totals else None
    best_decode = min(decode_times, key=decode_times.get) if decode_times else None
    print(f"best {dtype}: prefill {best_prefill}, decode {best_decode}", flush=True)
    return best_prefill, best_decode


# ------------------------------------------------------------------------------------------ report


def markdown(results: list[Result], machine: dict) -> str:
    lines = [
        f"GPU: {machine.get('gpu')}; torch {machine.get('torch')}, triton {machine.get('triton')}; "
        f"measured copy {machine.get('copy_gbps', 0):.0f} GB/s, bf16 matmul {machine.get('bf16_matmul_tflops', 0):.0f} TFLOP/s",
        *(f"tile configs {key.removeprefix('configs ')}: {value}" for key, value in machine.items() if key.startswith("configs")),
        "",
        "| kernel | case | dtype | ms | TFLOP/s | GB/s | best baseline (ms) | ours / best | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.note.startswith("sweep"):
            continue
        timed = {k: v for k, v in r.baselines.items() if v}
        best = min(timed.items(), key=lambda kv: kv[1]) if timed else None
        best_text = f"{best[0]} {best[1]:.3f}" if best else "-"
        speed = f"{best[1] / r.ms:.2f}x" if best else "-"
        lines.append(
            f"| {r.kernel} | {r.case} | {r.dtype.removeprefix('torch.')} | {r.ms:.3f} | "
            f"{'' if r.tflops is None else f'{r.tflops:.0f}'} | {'' if r.gbps is None else f'{r.gbps:.0f}'} | {best_text} | {speed} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="sweep tile configs and split counts per dtype first; the table then uses the best")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--dtypes", default=None, help="comma-separated torch dtypes (default float16,bfloat16; smoke: bfloat16)")
    parser.add_argument("--smoke", "--dry-run", dest="dry_run", action="store_true",
                        help="tiny shapes, one case per kernel variant, one call each, correctness only (CPU ok, seconds)")
    args = parser.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = "bfloat16" if args.dry_run else "float16,bfloat16"
    args.skip_baselines = False
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.type == "cpu" and not args.dry_run:
        parser.error("no CUDA device: only --smoke (--dry-run) runs on CPU")

    import triton

    torch.manual_seed(0)
    machine = {"gpu": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu (interpreter)", "torch": torch.__version__, "triton": triton.__version__}
    machine.update(ceilings(args))
    print(json.dumps(machine), flush=True)
    copy_gbps = machine.get("copy_gbps")

    results: list[Result] = []

    def record(result: Result):
        results.append(result)
        base = ", ".join(f"{k} {v:.3f}" for k, v in result.baselines.items() if v)
        rate = f"{result.tflops:.0f} TFLOP/s" if result.tflops is not None else f"{result.gbps:.0f} GB/s"
        print(f"{result.kernel:24s} {result.case:55s} {result.dtype:15s} {result.ms:8.3f} ms {rate:>12s}  [{base}] {result.note}", flush=True)

    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        pre = prefill_config(args.device, dtype, HEAD_DIM)
        dec = decode_config(args.device, dtype, HEAD_DIM)
        if args.sweep:
            best_prefill, best_decode = sweep(args, results, dtype)
            pre, dec = best_prefill or pre, best_decode or dec
        machine[f"configs {dtype}"] = {"prefill": asdict(pre), "decode": asdict(dec)}
        if args.dry_run:  # the cases below would shrink to duplicates: one of each variant, smallest shapes
            record(bench_masked(dtype, 2, False, pre, args))
            record(bench_masked(dtype, 2, True, pre, args))
            record(bench_paged_prefill(dtype, 2, 20, 45, 16, pre, args))
            record(bench_decode(dtype, 2, 70, 16, None, dec, args, copy_gbps))
            record(bench_decode(dtype, 2, 70, 32, 2, dec, args, copy_gbps))
            record(bench_store(dtype, 40, args, copy_gbps))
            continue
        record(bench_masked(dtype, 17, False, pre, args))
        record(bench_masked(dtype, 64, False, pre, args))
        record(bench_masked(dtype, 17, True, pre, args))
        record(bench_paged_prefill(dtype, 8, 512, 4096, 16, pre, args))
        for batch, context in ((1, 4096), (16, 4096), (64, 4096), (64, 4500)):
            record(bench_decode(dtype, batch, context, 16, None, dec, args, copy_gbps))
        record(bench_decode(dtype, 64, 4096, 32, None, dec, args, copy_gbps))
        record(bench_store(dtype, 8192, args, copy_gbps))
        record(bench_store(dtype, 64, args, copy_gbps))
    print()
    print(markdown(results, machine))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "results": [asdict(r) for r in results]}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
