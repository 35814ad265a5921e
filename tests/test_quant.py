"""int8 weights (smolvlm/quant.py, `quantize="int8"`): the quantization's error bound, the C kernel
against the reference product, and the quantized model against the fp32 model given the same
(dequantized) weights."""

from __future__ import annotations

import math

import pytest
import torch

from smolvlm import SmolVLM
from smolvlm.engine import Engine, SamplingParams
from smolvlm.quant import GROUP, Int8Linear, dequantize_int8, int8_linear, quantize_decoder, quantize_int8
from smolvlm_cpu_kernels import CpuKernels


def test_quantization_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 96)  # groups of very different magnitudes
    w[3, 32:64] = 0.0  # an all-zero group: scale 0, exact
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64, 3) and int(q.abs().max()) <= 127
    error = (w - dequantize_int8(q, scales)).abs()  # (64, 96)
    step = scales.repeat_interleave(GROUP, dim=1)
    assert bool((error <= step / 2 * (1 + 1e-6) + 1e-30).all()), float((error - step / 2).max())
    assert float(error[3, 32:64].max()) == 0.0
    group_max = q.abs().reshape(64, 3, 32).amax(-1)  # (64, 3): each group's largest |q|
    assert int(group_max[3, 1]) == 0 and bool((group_max.flatten()[torch.arange(192) != 3 * 3 + 1] == 127).all())
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int8(torch.randn(4, 40))


def x_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the AVX2 int8 kernel's rounding of x to int16 (one scale per group of 32) can add to each output:
    |dx| <= max |x_group| / 32767 / 2 per value, times |w| (plus a margin for the fp32 arithmetic of it)."""
    rows, k = x.shape
    step = x.float().reshape(rows, k // 32, 32).abs().amax(-1, keepdim=True) / 32767 / 2  # (rows, G, 1)
    return step.expand(rows, k // 32, 32).reshape(rows, k) @ w.abs().T * (1 + 2.0**-10)  # (rows, N)


@pytest.mark.parametrize("generic", [False, True], ids=["native", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_kernel_matches_the_reference(generic, dtype, rows):
    kernels = CpuKernels.load(generic=generic)
    flags = open("/proc/cpuinfo").read()
    assert kernels.q8_avx2 == (not generic and " avx2" in flags and " fma" in flags)  # the path this CPU should run
    torch.manual_seed(rows)
    w = torch.randn(300, 576)
    w[7, 64:96] = 0.0  # an all-zero group
    q, scales = quantize_int8(w)
    x = torch.randn(rows, 576).to(dtype)
    got = kernels.matvec_int8(x, q, scales)
    want = int8_linear(x.float(), q, scales)  # fp32 reference; bf16 x is exact in fp32
    # fp32 sums in another order: |error| <= K * 2^-23 * sum |w x| (a loose bound), plus one bf16 rounding;
    # the AVX2 path also rounds x to int16 per group of 32: |dx| <= max |x_group| / 32767 / 2 per value
    w = dequantize_int8(q, scales)
    magnitude = (x.float().abs() @ w.abs().T)  # (rows, 300)
    bound = 576 * 2.0**-23 * magnitude + (want.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0)
    if kernels.q8_avx2:
        bound = bound + x_rounding_bound(x, w)
    assert got.dtype == dtype and got.shape == (rows, 300) and kernels.accepts_int8(x, q)
    excess = (got.float() - want).abs() - bound
    assert float(excess.max()) <= 0, f"max excess {float(excess.max())} at {divmod(int(excess.argmax()), 300)}"
    with pytest.raises(ValueError, match="shapes"):
        kernels.matvec_int8(torch.randn(1, 64), q, scales)


@pytest.fixture(scope="module")
def int8_pair(tiny_ckpt):
    """(the tiny model with int8 decoder and LM head, the fp32 model given the dequantized weights)."""
    quantized = SmolVLM.from_pretrained(tiny_ckpt, quantize="int8")
    reference = SmolVLM.from_pretrained(tiny_ckpt)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Int8Linear):
                target = reference.get_submodule(name)
                if name == "lm_head" and reference.config.tie_word_embeddings:
                    target.weight = torch.nn.Parameter(dequantize_int8(module.qweight, module.scales))  # untied
                else:
                    target.weight.copy_(dequantize_int8(module.qweight, module.scales))
    return quantized, reference


def test_model_equals_fp32_with_the_dequantized_weights(int8_pair, tiny_ckpt):
    quantized, reference = int8_pair
    n = sum(isinstance(m, Int8Linear) for m in quantized.modules())
    assert n == 7 * quantized.config.text.num_hidden_layers + 1  # every projection and the LM head
    assert not any(isinstance(m, Int8Linear) for m in quantized.model.vision_model.modules())
    ids = torch.randint(0, quantized.config.text.vocab_size, (2, 40))
    with torch.inference_mode():
        assert torch.equal(quantized(ids), reference(ids))  # the same products, the same order
    fp32 = SmolVLM.from_pretrained(tiny_ckpt)
    with torch.inference_mode():
        drift = (quantized(ids) - fp32(ids)).abs().max()
    assert 0 < float(drift) < 0.1, float(drift)  # quantized: close to fp32, not equal to it


def test_engine_int8_logprobs_match_the_reference_forward(tiny_ckpt, int8_pair, monkeypatch):
    """The engine's decode steps (C int8 kernel, counted) against a plain forward of the int8 model (reference)."""
    quantized, _ = int8_pair
    engine = Engine.from_pretrained(tiny_ckpt, quantize="int8", max_model_len=512)
    assert engine.cpu_kernels is not None
    calls, layers = [], []
    kernels = type(engine.cpu_kernels)
    original, original_layer = kernels.matvec_int8, kernels.decoder_layer
    monkeypatch.setattr(kernels, "matvec_int8", lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(kernels, "decoder_layer", lambda self, *a: layers.append(1) or original_layer(self, *a))
    messages = [{"role": "user", "content": "Count to five."}]
    (result,) = engine.generate([messages], SamplingParams(max_new_tokens=8, logprobs=0))
    # 7 decode steps: every layer in one fused call (its int8 products in C), the LM head through matvec_int8
    assert len(layers) >= 7 * quantized.config.text.num_hidden_layers and len(calls) >= 7, (len(layers), len(calls))
    prompt = engine.prepare(messages).input_ids
    with torch.inference_mode():
        logp = quantized(torch.tensor([prompt + result.token_ids]))[0].log_softmax(-1)  # (T, vocab)
    for k, entry in enumerate(result.logprobs):
        row = logp[len(prompt) - 1 + k]
        # greedy: the engine's token is the reference's best, up to near-ties (no argmax equality asked)
        assert float(row.max()) - float(row[entry.token_id]) <= 1e-4, f"token {k}"
        assert math.isclose(entry.logprob, float(row[entry.token_id]), abs_tol=1e-4), (k, entry.logprob)


def test_bf16_model_with_int8_weights(tiny_ckpt):
    """bf16 activations: scales stay fp32 through .to(dtype); the engine's C path and the reference agree."""
    model = SmolVLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, quantize="int8")
    assert model.lm_head.scales.dtype == torch.float32 and model.lm_head.qweight.dtype == torch.int8
    assert model.to(torch.bfloat16).lm_head.scales.dtype == torch.float32
    x = torch.randn(2, model.lm_head.in_features).bfloat16()
    kernels = CpuKernels.load()
    got = kernels.matvec_int8(x, model.lm_head.qweight, model.lm_head.scales).float()
    want = int8_linear(x, model.lm_head.qweight, model.lm_head.scales).float()
    magnitude = x.float().abs() @ dequantize_int8(model.lm_head.qweight, model.lm_head.scales).abs().T
    bound = want.abs() * 2.0**-7 + x.shape[-1] * 2.0**-23 * magnitude  # one bf16 ulp + fp32 reordering
    if kernels.q8_avx2:
        bound = bound + x_rounding_bound(x, dequantize_int8(model.lm_head.qweight, model.lm_head.scales))
    assert float(((got - want).abs() - bound).max()) <= 0
    engine = Engine.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, quantize="int8", max_model_len=256)
    (result,) = engine.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=4))
    assert result.finish_reason in ("stop", "length"), result.error


def test_int8_refusals(tiny_ckpt, tmp_path):
    from smolvlm.train.checkpoint import save_model_dir
    from smolvlm.train.lora import AdapterError, LoraConfig, add_lora

    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_int8(torch.tensor([[float("inf")] + [0.0] * 31]))
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        Engine.from_pretrained(tiny_ckpt, quantize="int4")
    with_lora = SmolVLM.from_pretrained(tiny_ckpt)
    add_lora(with_lora, LoraConfig(r=2))
    with pytest.raises(ValueError, match="merge them first"):
        quantize_decoder(with_lora)
    quantized = SmolVLM.from_pretrained(tiny_ckpt, quantize="int8")
    with pytest.raises(AdapterError, match="int8 weights"):
        add_lora(quantized, LoraConfig(r=2))
    with pytest.raises(ValueError, match="int8 weights"):
        save_model_dir(quantized, tiny_ckpt, tmp_path / "out")
    before = quantized.fingerprint()
    quantized.lm_head.qweight[0, 0] += 1  # an in-place edit of an int8 weight: caches must see it
    assert quantized.fingerprint() != before


def test_quantize_is_opt_in_and_checked(tiny_ckpt):
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        SmolVLM.from_pretrained(tiny_ckpt, quantize="int4")
    model = SmolVLM.from_pretrained(tiny_ckpt)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # the default is the checkpoint as is
    quantize_decoder(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_decoder(model)


def test_cli_run_with_quantize_int8(tiny_ckpt):
    import subprocess
    import sys

    from smolvlm.cli import build_parser, load_engine

    args = build_parser().parse_args(["run", "--model", str(tiny_ckpt), "--quantize", "int8", "x"])
    assert isinstance(load_engine(args).model.lm_head, Int8Linear)  # the flag reaches the engine

    out = subprocess.run([sys.executable, "-m", "smolvlm.cli", "run", "--model", str(tiny_ckpt), "--quantize", "int8",
                          "-n", "8", "Count to five."], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    engine = Engine.from_pretrained(tiny_ckpt, quantize="int8")
    (want,) = engine.generate([[{"role": "user", "content": [{"type": "text", "text": "Count to five."}]}]],
                              SamplingParams(max_new_tokens=8))
    assert out.stdout == want.text + "\n"
