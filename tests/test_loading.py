"""Config parsing and strict weight loading: every failure names the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smolvlm import CheckpointError, ConfigError, SmolVLM, SmolVLMConfig
from smolvlm.text import CausalAttention, fused_weight

# The three published shapes (REFERENCE.md section 1), written as their config.json files do: the
# 256M/500M vision configs omit num_hidden_layers and intermediate_size.
VISION_BASE = {"model_type": "smolvlm_vision", "hidden_size": 768, "num_attention_heads": 12, "patch_size": 16,
               "image_size": 512}
CONFIGS = {
    "256M": {
        "model_type": "smolvlm", "image_token_id": 49190, "scale_factor": 4, "tie_word_embeddings": False,
        "vision_config": VISION_BASE,
        "text_config": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
                        "rope_theta": 100000, "max_position_embeddings": 8192, "vocab_size": 49280},
    },
    "500M": {
        "model_type": "smolvlm", "image_token_id": 49190, "scale_factor": 4,
        "vision_config": VISION_BASE,
        "text_config": {"model_type": "llama", "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                        "num_attention_heads": 15, "num_key_value_heads": 5, "rms_norm_eps": 1e-5,
                        "rope_theta": 100000, "max_position_embeddings": 8192, "vocab_size": 49280},
    },
    "2.2B": {
        "model_type": "smolvlm", "image_token_id": 49190, "scale_factor": 3,
        "vision_config": {"model_type": "smolvlm_vision", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
        "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                        "num_attention_heads": 32, "num_key_value_heads": 32,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 273768.0},
                        "max_position_embeddings": 16384, "vocab_size": 49280},
    },
}


@pytest.mark.parametrize("name,tokens,heads,kv,head_dim,layers", [
    ("256M", 64, 9, 3, 64, 12), ("500M", 64, 15, 5, 64, 12), ("2.2B", 81, 32, 32, 64, 27)])
def test_published_shapes_parse(name, tokens, heads, kv, head_dim, layers):
    config = SmolVLMConfig.from_dict(CONFIGS[name])
    assert config.image_seq_len == tokens
    assert (config.text.num_attention_heads, config.text.num_key_value_heads, config.text.head_dim) == (heads, kv, head_dim)
    assert config.vision.num_hidden_layers == layers
    assert config.text.rms_norm_eps == 1e-5


def test_256m_parameter_count():
    """The 256M shape has 256,484,928 parameters = the published 1.03 GB fp32 model.safetensors."""
    with torch.device("meta"):
        model = SmolVLM(SmolVLMConfig.from_dict(CONFIGS["256M"]))
    assert sum(p.numel() for p in model.parameters()) == 256_484_928


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["vision_config"].pop("hidden_size"), "vision_config.hidden_size is missing"),
    (lambda c: c["vision_config"].pop("patch_size"), "vision_config.patch_size is missing"),
    (lambda c: c.pop("image_token_id"), "image_token_id is missing"),
    (lambda c: c.pop("scale_factor"), "scale_factor is missing"),
    (lambda c: c["text_config"].pop("num_hidden_layers"), "text_config.num_hidden_layers is missing"),
    (lambda c: c["text_config"].update(num_attention_heads="nine"), "text_config.num_attention_heads should be int"),
    (lambda c: c["text_config"].update(num_key_value_heads=4), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(scale_factor=5), "scale_factor 5 must divide"),
    (lambda c: c.update(model_type="llava"), "not a SmolVLM checkpoint"),
    (lambda c: c.pop("text_config"), "text_config is missing"),
    (lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
])
def test_bad_config_raises_naming_the_field(edit, message):
    config = json.loads(json.dumps(CONFIGS["256M"]))
    edit(config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        SmolVLMConfig.from_dict(config)


@pytest.fixture
def tiny_copy(tiny_ckpt, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, target)
    return target


def _edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tiny_loads_and_dtype_device(tiny_ckpt):
    model = SmolVLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model.model.text_model.rotary_emb.inv_freq.dtype == torch.float32  # fp32 island
    ref = load_file(tiny_ckpt / "model.safetensors")["model.text_model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(model.model.text_model.layers[0].mlp.up_proj.weight, ref.to(torch.bfloat16))


def test_missing_tensor(tiny_copy):
    _edit_weights(tiny_copy, lambda t: t.pop("model.text_model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.text_model\.layers\.1\.self_attn\.k_proj\.weight"):
        SmolVLM.from_pretrained(tiny_copy)


def test_extra_tensor(tiny_copy):
    _edit_weights(tiny_copy, lambda t: t.update({"model.text_model.layers.7.mlp.gate_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.text_model\.layers\.7\.mlp\.gate_proj\.weight"):
        SmolVLM.from_pretrained(tiny_copy)


def test_misshaped_tensor(tiny_copy):
    name = "model.connector.modality_projection.proj.weight"
    _edit_weights(tiny_copy, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): model\.connector\.modality_projection\.proj\.weight: checkpoint"):
        SmolVLM.from_pretrained(tiny_copy)


def test_wrong_layer_count_in_config(tiny_copy):
    """A config that disagrees with the tensors (a defaulted field that is wrong) fails at load time."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 1
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.vision_model\.encoder\.layers\.1\."):
        SmolVLM.from_pretrained(tiny_copy)


def test_malformed_config_json(tiny_copy):
    (tiny_copy / "config.json").write_text('{"model_type": "smolvlm", ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        SmolVLM.from_pretrained(tiny_copy)


def test_corrupt_safetensors(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        SmolVLM.from_pretrained(tiny_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SmolVLM.from_pretrained(tmp_path / "nowhere" / "deeper")


def test_offline_repo_id_says_how_to_use_a_local_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = (
        "import smolvlm, sys\n"
        "try:\n"
        "    smolvlm.SmolVLM.from_pretrained('HuggingFaceTB/SmolVLM2-256M-Video-Instruct')\n"
        "except smolvlm.CheckpointError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "local checkpoint" in out.stdout


def test_import_does_not_import_transformers():
    code = "import sys, smolvlm; sys.exit(1 if 'transformers' in sys.modules else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, "import smolvlm imported transformers" + out.stderr


def test_kernels_folder_does_not_shadow_hf_kernels():
    """Our kernels/ folder installs as `smolvlm_kernels`: importable, and not found as `kernels`.

    transformers probes `importlib.util.find_spec("kernels")` for Hugging Face's own package.
    """
    repo_kernels = str(Path(__file__).resolve().parents[1] / "kernels")
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"ours = spec is not None and {repo_kernels!r} in str(spec.origin) + str(spec.submodule_search_locations)\n"
        "import transformers, smolvlm_kernels\n"
        "sys.exit(1 if ours else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr or "find_spec('kernels') found our kernels/ folder"


def test_tied_embeddings_checkpoint(tiny_copy):
    """A checkpoint with tie_word_embeddings stores no lm_head: it shares the input embeddings."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tiny_copy / "config.json").write_text(json.dumps(config))
    _edit_weights(tiny_copy, lambda t: t.pop("lm_head.weight"))
    model = SmolVLM.from_pretrained(tiny_copy)
    embed = model.model.text_model.embed_tokens.weight
    assert model.lm_head.weight is embed
    ids = torch.tensor([[1, 11126, 42, 2]])
    with torch.no_grad():
        hidden = model.decode(model.embed(ids), torch.arange(4)[None], CausalAttention(None, 4, torch.device("cpu")))
        assert torch.allclose(model(ids), hidden @ embed.T, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_equal_the_file_and_fused_matrices_are_views(tiny_ckpt, dtype):
    """On CPU the decoder's weights (streamed by every decode step) always land in the huge-page arena
    (weights.huge_page_arena), so the fused q/k/v and gate/up matrices of a decode step are views spanning
    the adjacent originals (no copy); other weights go there only when converted (bf16 from this fp32
    file) and are otherwise used as memory-mapped. Either way every parameter equals the file's tensor converted."""
    model = SmolVLM.from_pretrained(tiny_ckpt, dtype=dtype)
    file = load_file(str(tiny_ckpt / "model.safetensors"))
    params = dict(model.named_parameters())
    for name, tensor in file.items():
        assert torch.equal(params[name], tensor.to(dtype)), name
    text = model.model.text_model
    arena = text.layers[0].input_layernorm.weight.untyped_storage().data_ptr()
    one_row = torch.zeros(1, text.config.hidden_size, dtype=dtype)  # a decode step's activations
    for layer in text.layers:
        attn, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            qkv_weight = fused_weight(one_row, attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up_weight = fused_weight(one_row, mlp.gate_proj, mlp.up_proj)
        assert torch.equal(qkv_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        assert torch.equal(gate_up_weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        # the fused matrix is a view of the originals (an in-place edit of q_proj is seen by the fused path)
        assert attn.q_proj.weight.data_ptr() == qkv_weight.data_ptr()
        assert mlp.gate_proj.weight.data_ptr() == gate_up_weight.data_ptr()
        assert qkv_weight.untyped_storage().data_ptr() == arena
        assert mlp.down_proj.weight.untyped_storage().data_ptr() == arena
    assert model.lm_head.weight.untyped_storage().data_ptr() == arena
    vision_weight = model.model.vision_model.encoder.layers[0].mlp.fc1.weight
    assert (vision_weight.untyped_storage().data_ptr() == arena) == (dtype == torch.bfloat16), \
        "vision weights go to the arena only when converted"


def test_cpu_kernels_do_not_import_triton(tiny_ckpt):
    """The CPU decode kernels (package smolvlm_cpu_kernels) and a CPU engine never import Triton
    (~80 MB of resident memory)."""
    code = (
        "import sys\n"
        "from smolvlm_cpu_kernels import CpuKernels\n"
        "from smolvlm import Engine\n"
        f"engine = Engine.from_pretrained({str(tiny_ckpt)!r}, device='cpu')\n"
        "assert engine.cpu_kernels is not None and engine.backend.name == 'cpu'\n"
        "assert 'triton' not in sys.modules, 'the CPU path imported triton'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
