"""Every script in tools/ runs its smoke mode (`--smoke`: tiny checkpoint or tiny shapes, seconds) as a
subprocess from the repository root, and what it reports is checked: the rows of its table and the keys and
values of the JSON it writes, not only its exit status.

The scripts get the test cache's tiny checkpoint (the `tiny_ckpt` fixture) through their own flags, so none
of them builds a checkpoint of its own, except make_checkpoints.py, whose smoke mode is building one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # each run takes ~5-15 s on 2 idle cores; generous for a shared machine


def run_tool(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python tools/<script> --smoke *args` from the repo root; fails the test with its output if it fails."""
    command = [sys.executable, str(Path("tools") / script), "--smoke", *map(str, args)]
    try:
        return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                              text=True, timeout=TIMEOUT_S, check=True)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{' '.join(command)} exited {error.returncode}\n--- stdout\n{error.stdout[-6000:]}\n"
                    f"--- stderr\n{error.stderr[-6000:]}")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def table_rows(stdout: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown table rows of `stdout` whose first cell is `first_cell`."""
    rows = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_make_checkpoints_smoke(tmp_path, tiny_ckpt):
    out = tmp_path / "tiny"
    result = run_tool("make_checkpoints.py", "--out", out)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "tiny" and summary["kept"] is True and Path(summary["out"]) == out
    assert positive(summary["seconds"])
    expected_files = {path.name for path in tiny_ckpt.iterdir()}  # the cached build, same builder
    assert set(summary["files"]) == expected_files == {path.name for path in out.iterdir()}
    assert all(positive(size) for size in summary["files"].values())
    assert summary["files"]["model.safetensors"] == (tiny_ckpt / "model.safetensors").stat().st_size
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_ckpt / "config.json").read_text())
    assert summary["vocab_size"] == 49280
    assert summary["tensors"] == 59 and summary["parameters"] == 6_415_456  # TINY_CONFIG's
    assert (out / "BUILDER_VERSION").read_text().strip() == tiny_ckpt.name.rsplit("-v", 1)[1]


def test_bench_kernels_smoke(tmp_path):
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}  # no GPU: Triton's interpreter on CPU
    report_path = tmp_path / "kernels.json"
    result = run_tool("bench_kernels.py", "--json", report_path, env=env)
    report = json.loads(report_path.read_text())
    if not torch.cuda.is_available():
        assert report["machine"]["gpu"] == "cpu (interpreter)"
    results = report["results"]
    expected = [
        ("masked_attention", "vision B=2 T=40 H=2"),
        ("masked_attention", "vision B=2 T=40 H=2 padded"),
        ("paged_prefill_attention", "B=2 new=20 ctx=45 block=16"),
        ("paged_decode_attention", "B=2 ctx=70 block=16 splits=auto"),
        ("paged_decode_attention", "B=2 ctx=70 block=32 splits=2"),
        ("store_kv", "N=40 tokens, 3 kv heads"),
    ]
    assert [(r["kernel"], r["case"]) for r in results] == expected
    for r in results:
        assert r["dtype"] == "torch.bfloat16"
        assert positive(r["ms"]), r
        assert positive(r["tflops"] if r["kernel"] in ("masked_attention", "paged_prefill_attention") else r["gbps"]), r
        assert all(positive(ms) for ms in r["baselines"].values()), r
    assert results[2]["baselines"] == {} and "torch-index-put" in results[5]["baselines"]  # smoke: no flash-attn baseline
    printed = [row[:3] for kernel in dict(expected) for row in table_rows(result.stdout, kernel)]
    assert printed == [[kernel, case, "bfloat16"] for kernel, case in expected]


def test_bench_matvec_smoke(tmp_path):
    report_path = tmp_path / "matvec.json"
    result = run_tool("bench_matvec.py", "--json", report_path)
    report = json.loads(report_path.read_text())
    assert report["layers"] == 1 and report["lm_head"] == [1024, 576] and report["repeats"] == 3
    rows = report["rows"]
    assert [(r["dtype"], r["rows"]) for r in rows] == [("bfloat16", 1), ("bfloat16", 2), ("float32", 1), ("float32", 2)]
    for r in rows:
        for key in ("torch_ms", "torch_gb_s", "c_ms", "c_gb_s", "speedup"):
            assert positive(r[key]), (key, r)
        assert 0 <= r["max_rel_diff"] <= (2e-2 if r["dtype"] == "bfloat16" else 1e-4), r
    printed = [line.split()[:2] for line in result.stdout.splitlines() if line.split()[:1] in (["bfloat16"], ["float32"])]
    assert printed == [[r["dtype"], str(r["rows"])] for r in rows]


def test_bench_processor_smoke(tmp_path, tiny_ckpt):
    report_path = tmp_path / "processor.json"
    result = run_tool("bench_processor.py", "--processor-dir", tiny_ckpt, "--json", report_path)
    report = json.loads(report_path.read_text())
    assert report["processor_dir"] == str(tiny_ckpt) and report["repeats"] == 1
    image, video = "image 512x512", "video 6 s 160x120"
    assert [(r["input"], r["implementation"]) for r in report["rows"]] == [
        (image, "ours"),
        (image, "transformers, Pillow image processor"),
        (image, "transformers, default (torchvision) image processor"),
        (video, "ours"),
        (video, "transformers (decord + video processor)"),
    ]
    for r in report["rows"]:
        assert positive(r["seconds"]), r
        # tiny processor: 512² -> 256² -> 4x4 tiles of 64 px + the global one; 6 s at 1 fps -> 6 frames
        assert r["images"] == (17 if r["input"] == image else 6), r
    assert [(p["input"], p["ids_masks_identical"], p["pixel_max_abs_diff"]) for p in report["parity"]] == [
        (image, True, 0.0),
        (video, True, 0.0),
    ]
    printed = [line for line in result.stdout.splitlines() if line.startswith((image, video)) and "identical" not in line]
    assert [line.split()[-1] for line in printed] == ["17", "17", "17", "6", "6"]  # the `images` column


def test_bench_e2e_smoke(tmp_path, tiny_ckpt):
    report_path = tmp_path / "e2e.json"
    result = run_tool("bench_e2e.py", "--model", tiny_ckpt, "--json", report_path)
    report = json.loads(report_path.read_text())
    assert report["model"] == str(tiny_ckpt) and report["repeats"] == 1
    assert report["model_shape"] == "text 64 x 2 layers, vision 32 x 2 layers"
    assert positive(report["bandwidth"]["bandwidth_gb_s"]) and report["bandwidth"]["buffer_mb"] == 16
    assert list(report["runs"]) == ["fp32"]
    run = report["runs"]["fp32"]
    summary = run["summary"]
    assert [name for name in summary if not name.startswith("_")] == ["photo"]
    photo = summary["photo"]
    for framework in ("smolvlm", "transformers"):
        row = photo[framework]
        for key in ("preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tok_s", "peak_rss_mb", "decode_fraction_of_limit"):
            assert positive(row[key]), (framework, key, row)
        assert row["prompt_tokens"] == photo["smolvlm"]["prompt_tokens"] > 17 * 16  # 17 tiles x 16 <image> tokens
        assert row["samples_used"] == "1/1"
        samples = run["samples"]["photo"][framework]
        assert len(samples) == 1 and samples[0]["new_tokens"] == 3 and len(samples[0]["token_ids"]) == 3
        assert samples[0]["waited_for_quiet_s"] == 0.0  # smoke: no quiet-wait
        assert positive(summary["_load"][framework])
        assert [child["scenario"] for child in run["children"][framework]] == ["photo"]
    assert photo["same_tokens"] is True  # greedy fp32 parity, as tests/test_engine.py checks on this checkpoint
    assert positive(photo["decode_limit_tok_s"]) and positive(summary["_weight_bytes_per_token"])
    assert "C decode kernels" in run["children"]["smolvlm"][0]["decode_path"]
    [row] = table_rows(result.stdout, "photo")
    assert row[-2] == "yes" and " / " in row[2]

    # the saved samples re-summarise without measuring anything
    markdown_path = tmp_path / "e2e.md"
    subprocess.run([sys.executable, "tools/bench_e2e.py", "--from-json", str(report_path), "--markdown", str(markdown_path)],
                   cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    [rerendered] = table_rows(markdown_path.read_text(), "photo")
    assert rerendered == row


def test_compare_with_transformers_smoke(tmp_path, tiny_ckpt):
    report_path = tmp_path / "compare.json"
    result = run_tool("compare_with_transformers.py", "--model", tiny_ckpt, "--json", report_path, "--fail-above", "1e-4")
    rows = {r["stage"]: r for r in json.loads(report_path.read_text())["rows"]}
    layers = json.loads((tiny_ckpt / "config.json").read_text())["text_config"]["num_hidden_layers"]
    expected = (["vision.embeddings", "vision.layers.0", "vision.layers.1", "vision.post_layernorm", "connector",
                 "inputs_embeds"] + [f"text.layers.{i}" for i in range(layers - 1)]
                + ["text.norm", "logits", "logits (end to end)"])
    assert list(rows) == expected and all(line.split()[0] in result.stdout for line in expected)
    for name in ("vision.post_layernorm", "connector", "text.norm", "logits"):  # the same arithmetic, same inputs
        assert rows[name]["max_abs"] == 0.0 and positive(rows[name]["ref_max_abs"]), rows[name]
    assert rows["logits (end to end)"]["max_abs"] <= 1e-4


def test_bench_ab_smoke(tmp_path):
    report_path = tmp_path / "ab.json"
    result = run_tool("bench_ab.py", "--json", report_path)  # this tree against HEAD, tiny checkpoint
    report = json.loads(report_path.read_text())
    assert report["against"] == "HEAD" and set(report["medians"]) == {"this tree", "HEAD"}
    for medians in report["medians"].values():
        assert positive(medians["forward_s"]) and positive(medians["decode_tok_s"]), medians
    assert "| ratio this / HEAD |" in result.stdout and "CPU:" in result.stdout


def test_bench_finetune_smoke(tmp_path, tiny_ckpt):
    report_path = tmp_path / "finetune.json"
    result = run_tool("bench_finetune.py", "--model", tiny_ckpt, "--json", report_path)
    report = json.loads(report_path.read_text())
    sides = {r["side"]: r for r in report["results"]}
    assert list(sides) == ["smolvlm", "peft", "smolvlm-cached"]
    for r in sides.values():
        assert len(r["step_s"]) == 2 and all(positive(t) for t in r["step_s"]) and positive(r["peak_steps_mb"]), r
        assert r["trainable"] == sides["peft"]["trainable"] > 0  # the same adapters on both sides
    # the same weights and tensors: the first step's loss agrees (B = 0, so the adapters change nothing yet)
    assert abs(sides["smolvlm"]["losses"][0] - sides["peft"]["losses"][0]) <= 1e-5 * sides["peft"]["losses"][0]
    assert [row[0] for row in table_rows(result.stdout, "smolvlm")] == ["smolvlm"]


def test_bench_serve_smoke(tmp_path, tiny_ckpt):
    report_path = tmp_path / "serve.json"
    result = run_tool("bench_serve.py", "--model", tiny_ckpt, "--json", report_path)
    report = json.loads(report_path.read_text())
    assert [r["concurrency"] for r in report["sweep"]] == [1, 2]
    for r in report["sweep"]:
        assert r["requests"] == 4 and len(r["ttft"]) == 4 and all(positive(t) for t in r["ttft"]), r
        assert positive(r["requests_per_s"]) and r["tokens"] == 4 * 4  # 4 requests x max_tokens 4 (no eos in 4 tokens)
    single = report["single"]
    assert len(single["rows"]) == 2 and positive(single["total_ratio"])
    assert [row[0] for row in table_rows(result.stdout, "server (HTTP + SSE)")] == ["server (HTTP + SSE)"]


def test_eval_int8_smoke(tmp_path, tiny_ckpt):
    report_path = tmp_path / "int8.json"
    result = run_tool("eval_int8.py", "--model", tiny_ckpt, "--json", report_path)
    report = json.loads(report_path.read_text())
    assert set(report["speed"]) == {"fp32", "int8"}
    assert all(positive(s["median"]) and positive(s["peak_rss_mb"]) for s in report["speed"].values())
    acc = report["accuracy"]
    assert acc["prompts"] == 2 and acc["positions"] > 0
    assert 0 < acc["logit_max_abs"] < 1 and 0 <= acc["top1_agreement"] <= 1  # quantized: close, not equal
    assert [row[0] for row in table_rows(result.stdout, "int8")] == ["int8"]


FAKE_MTMD = r'''
import os, sys, time
args = sys.argv[1:]
if args == ["--version"]:
    print("version: 1 (stand-in)", file=sys.stderr)
    sys.exit(0)
for flag in ("-m", "--mmproj", "--image"):
    assert os.path.isfile(args[args.index(flag) + 1]), (flag, args)
n = int(args[args.index("-n") + 1])
assert "--ignore-eos" in args and args[args.index("--temp") + 1] == "0" and args[args.index("-lv") + 1] == "4"
print("loading model ...", file=sys.stderr, flush=True)
print("0.01.166.141 W WARN: This is an experimental CLI for testing multimodal capability.", file=sys.stderr, flush=True)
time.sleep(0.2)  # "reading, encoding and prefilling the image"
print("", flush=True)  # the newline after the prompt's evaluation
for i in range(n):
    print(f"tok{i} ", end="", flush=True)
    time.sleep(0.01)
print("llama_perf_context_print: prompt eval time =     200.00 ms /   123 tokens", file=sys.stderr)
print(f"llama_perf_context_print:        eval time =      {10.0 * (n - 1):.2f} ms /     {n - 1} runs", file=sys.stderr)
'''
FAKE_BENCH = r'''
import json, sys
args = sys.argv[1:]
assert args[args.index("-p") + 1] == "0" and "-o" in args
print(json.dumps([{"avg_ts": 123.5, "n_gen": int(args[args.index("-n") + 1])}]))
'''
FAKE_CONVERT = r'''
import json, pathlib, sys
args = sys.argv[1:]
source = pathlib.Path(args[0])
assert json.loads((source / "config.json").read_text())["text_config"]["architectures"] == ["VLlama3ForCausalLM"]
pathlib.Path(args[args.index("--outfile") + 1]).write_bytes(b"GGUF stand-in " + " ".join(args[1:]).encode())
'''


def test_bench_llamacpp_smoke(tmp_path, tiny_ckpt):
    """The llama.cpp comparison end to end, with stand-ins for llama.cpp's tools (CI has no llama.cpp
    build): our side runs for real on the tiny checkpoint; the stand-ins print what llama-mtmd-cli /
    llama-bench print, so the parsing (TTFT from stamped output, decode from its timings, peak RSS
    from wait4), the conversion step and the tables are checked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, source in (("llama-mtmd-cli", FAKE_MTMD), ("llama-bench", FAKE_BENCH)):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\n{source}")
        tool.chmod(0o755)
    convert = tmp_path / "convert_hf_to_gguf.py"
    convert.write_text(FAKE_CONVERT)
    report_path, gguf = tmp_path / "llama.json", tmp_path / "gguf"
    result = run_tool("bench_llamacpp.py", "--model", tiny_ckpt, "--llama-bin", bin_dir, "--convert", convert,
                      "--gguf-dir", gguf, "--json", report_path)
    assert sorted(p.name for p in gguf.iterdir()) == ["mmproj-f32-video.gguf", "mmproj-f32.gguf", "text-f32.gguf"]
    assert b"--mmproj" in (gguf / "mmproj-f32-video.gguf").read_bytes()
    report = json.loads(report_path.read_text())
    assert report["llama_cpp"] == "version: 1 (stand-in)" and list(report["runs"]) == ["fp32"]
    summary = report["runs"]["fp32"]["summary"]
    assert summary["text"]["llama.cpp"]["decode_tok_s"] == 123.5
    assert positive(summary["text"]["smolvlm"]["decode_tok_s"])
    photo = summary["photo"]
    assert math.isclose(photo["llama.cpp"]["decode_tok_s"], 100.0)  # 2 runs in 20 ms
    assert 0.2 <= photo["llama.cpp"]["ttft_s"] < 5 and photo["llama.cpp"]["prompt_tokens"] == 123
    assert positive(photo["llama.cpp"]["peak_rss_mb"]) and positive(photo["smolvlm"]["peak_rss_mb"])
    assert photo["smolvlm"]["prompt_tokens"] > 17 * 16  # 17 tiles x 16 <image> tokens
    assert positive(photo["smolvlm"]["ttft_s"])
    assert math.isclose(photo["ratio"]["ttft"], photo["llama.cpp"]["ttft_s"] / photo["smolvlm"]["ttft_s"])
    samples = report["runs"]["fp32"]["samples"]["photo"]["llama.cpp"]
    assert samples[0]["text"] == "tok0 tok1 tok2"
    assert "| fp32 | photo | TTFT s" in result.stdout and "| fp32 | text | decode tok/s" in result.stdout
