"""The model owns every stage and every weight; an engine only passes arguments (ops, attention).

- Engines built on one model leave it as it was, and do not affect each other or a plain model call.
- A weight edited in place, a projection replaced by a wrapper, a hook on a projection: every path
  (fused or separate products, PyTorch or C kernels) computes from the modules as they are now.
- `model.to(...)` leaves no copy of a weight behind (no module holds a tensor outside its parameters
  and buffers).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conversations import user
from smolvlm import SmolVLM
from smolvlm.engine import Engine, EngineConfig, SamplingParams
from smolvlm.processing import Processor

PARAMS = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
PATHS = ["c", "torch"]  # EngineConfig.cpu_kernels: the C decode kernels, or plain PyTorch


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return Processor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def image_file(photos, tmp_path_factory):
    path = tmp_path_factory.mktemp("seams") / "astronaut.png"
    photos["astronaut"].convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def conversations(image_file):
    return [user("Write a long story about a cat and a dog."), user(("image", image_file), "What is in this picture?")]


def answers(engine, conversations) -> list[list[int]]:
    results = engine.generate(conversations, PARAMS)
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.token_ids for r in results]


def engine_on(model, processor, cpu_kernels: str) -> Engine:
    engine = Engine(model, processor, EngineConfig(cpu_kernels=cpu_kernels, num_kv_blocks=256))
    assert (engine.cpu_kernels is not None) == (cpu_kernels == "c")
    return engine


def state_of(model) -> dict:
    """Everything an engine could have changed on a model: each module's attributes (by identity and,
    for tensors, address and value), its hooks."""
    state = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                for tensor_name, t in value.items():
                    state[f"{name}.{tensor_name}"] = None if t is None else (id(t), t.data_ptr(), t.clone())
            elif key == "_modules":
                state[f"{name}._modules"] = {k: id(v) for k, v in value.items()}
            elif not key.startswith("_") or "hooks" in key:
                state[f"{name}.{key}"] = value if not isinstance(value, dict) else dict(value)
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))
    for key, old in before.items():
        new = after[key]
        if isinstance(old, tuple) and len(old) == 3 and isinstance(old[2], torch.Tensor):
            assert old[:2] == new[:2] and torch.equal(old[2], new[2]), f"{key} changed"
        else:
            assert old == new, f"{key} changed: {old!r} -> {new!r}"


def test_two_engines_on_one_model_leave_it_as_it_was(tiny_ckpt, processor, conversations):
    alone = {path: answers(engine_on(SmolVLM.from_pretrained(tiny_ckpt), processor, path), conversations) for path in PATHS}

    model = SmolVLM.from_pretrained(tiny_ckpt)
    ids = processor(conversations[1], add_generation_prompt=True)
    with torch.inference_mode():
        logits_before = model(ids["input_ids"], ids["pixel_values"], ids["pixel_attention_mask"])
    state_before = state_of(model)
    engines = {path: engine_on(model, processor, path) for path in PATHS}
    assert_same_state(state_before, state_of(model))
    # used in turns, each engine answers as when it was alone on its own model
    for path in [*PATHS, *reversed(PATHS)]:
        assert answers(engines[path], conversations) == alone[path], f"cpu_kernels={path!r} next to another engine"
    with torch.inference_mode():
        logits_after = model(ids["input_ids"], ids["pixel_values"], ids["pixel_attention_mask"])
    assert torch.equal(logits_before, logits_after), (logits_before - logits_after).abs().max()
    assert_same_state(state_before, state_of(model))


class Halved(nn.Module):
    """A wrapper put in a projection's place (as a LoRA or a research intervention would be)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 * self.inner(x)


def zero_down_proj(model) -> None:
    with torch.no_grad():
        model.model.text_model.layers[0].mlp.down_proj.weight.zero_()


def scale_q_proj_in_place(model) -> None:  # a weight of a fused group (q/k/v), edited where it lies
    with torch.no_grad():
        model.model.text_model.layers[1].self_attn.q_proj.weight.mul_(-3.0)


def wrap_q_proj(model) -> None:
    attn = model.model.text_model.layers[0].self_attn
    attn.q_proj = Halved(attn.q_proj)


def wrap_gate_proj(model) -> None:
    mlp = model.model.text_model.layers[1].mlp
    mlp.gate_proj = Halved(mlp.gate_proj)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("change", [zero_down_proj, scale_q_proj_in_place, wrap_q_proj, wrap_gate_proj],
                         ids=lambda f: f.__name__)
def test_a_changed_model_changes_the_engine_built_before(tiny_ckpt, processor, conversations, path, change):
    model = SmolVLM.from_pretrained(tiny_ckpt)
    engine = engine_on(model, processor, path)
    before = answers(engine, conversations)
    change(model)
    after = answers(engine, conversations)
    fresh = answers(engine_on(model, processor, path), conversations)
    assert after == fresh, "the engine built before the change answers differently from a fresh one"
    assert after != before, f"{change.__name__} did not change the answers: was it ignored?"
    for module in model.modules():
        if isinstance(module, Halved):
            assert module.calls > 0, "the wrapper was never called"


@pytest.mark.parametrize("path", PATHS)
def test_hooks_on_fused_projections_see_every_step(tiny_ckpt, processor, path):
    """The q/k/v and gate/up products run fused only when that equals calling the modules: a hook on
    one of them makes every step call the modules, so the hook sees the prompt and every decode step."""
    model = SmolVLM.from_pretrained(tiny_ckpt)
    engine = engine_on(model, processor, path)
    rows = []
    handle = model.model.text_model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: rows.append(output.shape[0])
    )
    try:
        [result] = engine.generate([user("Hello there")], PARAMS)
    finally:
        handle.remove()
    assert len(rows) == len(result.token_ids), rows  # one prefill step, then one per generated token but the last
    assert rows[0] == result.num_prompt_tokens and set(rows[1:]) == {1}, rows


def tensors_outside_parameters(model) -> list[str]:
    """Tensors a module holds as plain attributes (copies that `.to()` would not convert)."""
    found = []
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                found.append(f"{name}.{key}")
    return found


def test_to_leaves_no_stale_weight_copy(tiny_ckpt, processor, conversations):
    model = SmolVLM.from_pretrained(tiny_ckpt)
    assert tensors_outside_parameters(model) == []
    model.to(torch.bfloat16)
    assert tensors_outside_parameters(model) == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # every path computes from the converted weights: the same answers as a model loaded in bf16
    loaded = SmolVLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    assert answers(engine_on(model, processor, "c"), conversations) == answers(engine_on(loaded, processor, "c"), conversations)
    rope = model.model.text_model.rotary_emb.inv_freq
    assert rope.dtype == torch.float32 and torch.equal(rope, loaded.model.text_model.rotary_emb.inv_freq)
    # the converted weights no longer lie back to back, so a short prompt's q/k/v run as three products
    # (PyTorch's bf16 GEMM may round those differently from one); packing them again restores the layout
    model.model.text_model.pack_projections()
    ids = processor(conversations[0], add_generation_prompt=True)["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(ids), loaded(ids))
    model.to("meta")  # a device change: nothing stays behind on the CPU
    on_cpu = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert on_cpu == [] and tensors_outside_parameters(model) == []


def test_fingerprint_sees_edited_replaced_and_hooked_weights(tiny_ckpt):
    """What decides whether an engine's prefix and vision caches, and its captured CUDA graphs, are
    stale (the graphs need a GPU; the fingerprint does not)."""
    model = SmolVLM.from_pretrained(tiny_ckpt)
    start = model.fingerprint()
    assert model.fingerprint() == start
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    assert model.fingerprint() == start, "running the model changed its fingerprint"
    scale_q_proj_in_place(model)
    edited = model.fingerprint()
    assert edited != start
    start = edited
    mlp = model.model.text_model.layers[0].mlp
    mlp.down_proj.weight = nn.Parameter(mlp.down_proj.weight.detach().clone())
    replaced = model.fingerprint()
    assert replaced != start
    wrap_q_proj(model)
    wrapped = model.fingerprint()
    assert wrapped != replaced
    handle = mlp.up_proj.register_forward_hook(lambda *args: None)
    assert model.fingerprint() != wrapped
    handle.remove()
    assert model.fingerprint() == wrapped
