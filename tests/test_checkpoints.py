"""The test checkpoints themselves (tools/make_checkpoints.py): configs, tokens, weight names, the GGUF graft.

Everything else in the suite trusts these directories, so they are checked here against REFERENCE.md and
against independent computations (transformers' own save_pretrained names, the `gguf` package's dequantizer).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

# REFERENCE.md section 3: "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:"
CHAT_EXAMPLE = "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:"
CHAT_EXAMPLE_IDS = [1, 11126, 42, 49190, 7306, 346, 5125, 451, 2443, 47, 49279, 198, 9519, 9531, 42]
CHAT_EXAMPLE_TOKENS = ["<|im_start|>", "User", ":", "<image>", "Can", "Ġyou", "Ġdescribe", "Ġthis", "Ġimage", "?",
                       "<end_of_utterance>", "Ċ", "Ass", "istant", ":"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol: float = 0.0) -> None:
    diff = (actual.float() - expected.float()).abs()
    where = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
    assert diff.max() <= atol, f"{name}: max abs diff {float(diff.max()):.3g} at {where} (atol {atol})"


# ---------------------------------------------------------------------------------------------
# Tokenizer and processor files
# ---------------------------------------------------------------------------------------------


def test_added_token_ids_are_exact(processor_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(processor_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 49280
    expected = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<global-img>": 49152,
                "<fake_token_around_image>": 49189, "<image>": 49190, "<end_of_utterance>": 49279,
                "<|reserved_special_token_0|>": 49191, "<|reserved_special_token_87|>": 49278}
    for r in range(1, 7):
        for c in range(1, 7):
            expected[f"<row_{r}_col_{c}>"] = 49153 + (r - 1) * 6 + (c - 1)
    actual = {token: tokenizer.token_to_id(token) for token in expected}
    assert actual == expected
    # Every id 49152..49279 is one of the 128 added tokens, in order, each a single unsplittable token.
    added = [tokenizer.id_to_token(i) for i in range(49152, 49280)]
    assert len(set(added)) == 128
    assert [tokenizer.encode(token).ids for token in added] == [[i] for i in range(49152, 49280)]


def test_chat_example_tokenizes_to_expected_ids(processor_dir):
    """Both our runtime's tokenizer library and transformers give the same ids; nothing (no BOS) is added."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(processor_dir / "tokenizer.json")).encode(CHAT_EXAMPLE)
    assert raw.ids == CHAT_EXAMPLE_IDS
    assert raw.tokens == CHAT_EXAMPLE_TOKENS
    hf = AutoTokenizer.from_pretrained(processor_dir)
    assert hf(CHAT_EXAMPLE).input_ids == CHAT_EXAMPLE_IDS
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 49279, 2, 0)
    assert hf.decode(CHAT_EXAMPLE_IDS, skip_special_tokens=True) == "User:Can you describe this image?\nAssistant:"
    # "\n\n" is one token (1116) when followed by a special token; digits are single tokens.
    assert hf("a\n\n<image> 123").input_ids == [81, 1116, 49190, 216, 33, 34, 35]


def test_chat_template_renders_reference_example(processor_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_dir)
    image_first = [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "Can you describe this image?"}]}]
    assert processor.apply_chat_template(image_first, add_generation_prompt=True) == CHAT_EXAMPLE
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]
    assert processor.apply_chat_template(text_only) == (
        "<|im_start|>User: Hi<end_of_utterance>\nAssistant: Hello.<end_of_utterance>\n")


def test_processor_expands_image_into_reference_tiles(processor_dir, photos):
    """A 512x512 photo: 4x4 tiles + global tile, 64 <image> each (REFERENCE.md section 5), 1127 tokens."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_dir)
    assert (processor.image_seq_len, processor.image_token_id) == (64, 49190)
    messages = [{"role": "user", "content": [{"type": "image", "image": photos["astronaut"]},
                                             {"type": "text", "text": "Can you describe this image?"}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 17, 3, 512, 512)
    image = "<image>" * 64
    expected = ""
    for r in range(1, 5):
        expected += "".join(f"<fake_token_around_image><row_{r}_col_{c}>{image}" for c in range(1, 5)) + "\n"
    expected += f"\n<fake_token_around_image><global-img>{image}<fake_token_around_image>"
    expected_ids = processor.tokenizer(CHAT_EXAMPLE.replace("<image>", expected)).input_ids
    ids = batch["input_ids"][0].tolist()
    assert ids == expected_ids
    assert ids.count(49190) == 17 * 64
    assert len(ids) == 1127 + len(CHAT_EXAMPLE_IDS) - 1


def test_processor_files_hold_reference_values(processor_dir, tiny_ckpt, make_checkpoints):
    real = read_json(processor_dir / "preprocessor_config.json")
    assert real["max_image_size"] == {"longest_edge": 512}
    assert real["size"] == {"longest_edge": 2048}
    assert real["video_sampling"] == {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}
    assert (real["image_mean"], real["image_std"], real["resample"]) == ([0.5] * 3, [0.5] * 3, 1)
    assert real["rescale_factor"] == pytest.approx(1 / 255, rel=1e-15)
    assert read_json(processor_dir / "processor_config.json")["image_seq_len"] == 64
    assert read_json(processor_dir / "generation_config.json") == {"bos_token_id": 0, "eos_token_id": 49279,
                                                                   "pad_token_id": 2}
    template = read_json(processor_dir / "chat_template.json")["chat_template"]
    assert template == make_checkpoints.CHAT_TEMPLATE
    assert read_json(processor_dir / "tokenizer_config.json")["chat_template"] == template

    tiny = read_json(tiny_ckpt / "preprocessor_config.json")
    assert tiny["max_image_size"] == {"longest_edge": 64}
    assert tiny["size"] == {"longest_edge": 256}
    assert tiny["video_sampling"]["video_size"] == {"longest_edge": 64}
    # image_seq_len = (image_size / patch_size)^2 / scale_factor^2 must agree with the tiny model.
    config = read_json(tiny_ckpt / "config.json")
    vision = config["vision_config"]
    seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2
    assert read_json(tiny_ckpt / "processor_config.json")["image_seq_len"] == seq_len == 16
    assert (tiny_ckpt / "tokenizer.json").read_bytes() == (processor_dir / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------------------------------------
# Model checkpoints
# ---------------------------------------------------------------------------------------------


def test_tiny_checkpoint_matches_transformers_layout(tiny_ckpt, tmp_path):
    """Tensor names and shapes are what transformers' save_pretrained writes; it loads with nothing missing."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    config = read_json(tiny_ckpt / "config.json")
    text, vision = config["text_config"], config["vision_config"]
    assert (text["vocab_size"], text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["num_key_value_heads"], text["head_dim"], text["intermediate_size"]) == (49280, 64, 2, 4, 2, 16, 128)
    assert (text["rope_theta"], text["rms_norm_eps"], text["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"],
            vision["intermediate_size"], vision["image_size"], vision["patch_size"]) == (32, 2, 4, 64, 64, 8)
    assert (config["scale_factor"], config["image_token_id"], config["tie_word_embeddings"]) == (2, 49190, False)

    reference = SmolVLMForConditionalGeneration(SmolVLMConfig(**config))
    reference.save_pretrained(tmp_path)
    assert safetensors_shapes(tiny_ckpt / "model.safetensors") == safetensors_shapes(tmp_path / "model.safetensors")

    model, info = SmolVLMForConditionalGeneration.from_pretrained(tiny_ckpt, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.config.text_config.rope_parameters["rope_theta"] == 100000.0
    assert model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr()


def test_tiny_weights_exercise_norms_and_biases(tiny_ckpt):
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        weights = {name: f.get_tensor(name) for name in f.keys()}
    assert all(w.dtype == torch.float32 for w in weights.values())
    norms = [n for n in weights if "norm" in n and n.endswith(".weight")]
    biases = [n for n in weights if n.endswith(".bias")]
    assert len(norms) == 2 * 2 + 1 + 2 * 2 + 1  # text: 2 per layer + final; vision: 2 per layer + post
    for name in norms:
        assert 0.03 < (weights[name] - 1).std() < 0.3, name
    for name in biases:
        assert 0.03 < weights[name].std() < 0.3, name
    # Matrices are N(0, 1/fan_in): activations stay O(1), attention is far from uniform.
    q = weights["model.text_model.layers.0.self_attn.q_proj.weight"]
    assert q.std() * 64**0.5 == pytest.approx(1.0, rel=0.1)


def test_real_checkpoint_has_256m_names_and_shapes(real_ckpt):
    config = read_json(real_ckpt / "config.json")
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["num_key_value_heads"], text["head_dim"], text["vocab_size"]) == (576, 1536, 30, 9, 3, 64, 49280)
    assert (vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"],
            vision["num_attention_heads"], vision["image_size"], vision["patch_size"]) == (768, 3072, 12, 12, 512, 16)
    assert (config["scale_factor"], config["tie_word_embeddings"]) == (4, False)

    shapes = safetensors_shapes(real_ckpt / "model.safetensors")
    assert len(shapes) == 471
    assert sum(int(np.prod(s)) for s in shapes.values()) == 256_484_928
    # REFERENCE.md section 4, spot checks of every kind of tensor.
    assert shapes["model.vision_model.embeddings.patch_embedding.weight"] == (768, 3, 16, 16)
    assert shapes["model.vision_model.embeddings.position_embedding.weight"] == (1024, 768)
    assert shapes["model.vision_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert shapes["model.vision_model.encoder.layers.0.self_attn.out_proj.bias"] == (768,)
    assert shapes["model.vision_model.post_layernorm.bias"] == (768,)
    assert shapes["model.connector.modality_projection.proj.weight"] == (576, 12288)
    assert "model.connector.modality_projection.proj.bias" not in shapes
    assert shapes["model.text_model.embed_tokens.weight"] == (49280, 576)
    assert shapes["model.text_model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.text_model.layers.0.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.text_model.norm.weight"] == (576,)
    assert shapes["lm_head.weight"] == (49280, 576)
    with safe_open(str(real_ckpt / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("lm_head.weight").get_dtype() == "F32"


# ---------------------------------------------------------------------------------------------
# The grafted SmolLM2 decoder, checked against the `gguf` package's own dequantizer
# ---------------------------------------------------------------------------------------------


def unpermute_llama_cpp_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows (it interleaves each head's two rotary halves)."""
    rows = weight.shape[0]
    # GGUF row order per head: (half_dim, 2) pairs; HF order: (2, half_dim).
    return weight.reshape(num_heads, rows // num_heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def test_grafted_text_weights_equal_dequantized_gguf(grafted_ckpt, make_checkpoints):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(make_checkpoints.find_smollm2_gguf()))
    gguf = {t.name: t for t in reader.tensors}

    def gguf_tensor(name: str) -> torch.Tensor:
        t = gguf[name]
        if len(t.shape) == 1:  # float32 norm weights are stored as is
            return torch.tensor(np.array(t.data, dtype=np.float32))
        values = dequantize(t.data, t.tensor_type)  # (rows, row_length): numpy's order, reversed from GGUF's
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(t.data.shape[0], -1))

    pairs = {
        "model.text_model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", 9),
        "model.text_model.layers.29.self_attn.k_proj.weight": ("blk.29.attn_k.weight", 3),
        "model.text_model.layers.7.self_attn.v_proj.weight": ("blk.7.attn_v.weight", None),
        "model.text_model.layers.13.self_attn.o_proj.weight": ("blk.13.attn_output.weight", None),
        "model.text_model.layers.3.mlp.gate_proj.weight": ("blk.3.ffn_gate.weight", None),
        "model.text_model.layers.21.mlp.down_proj.weight": ("blk.21.ffn_down.weight", None),
        "model.text_model.layers.5.input_layernorm.weight": ("blk.5.attn_norm.weight", None),
        "model.text_model.layers.5.post_attention_layernorm.weight": ("blk.5.ffn_norm.weight", None),
        "model.text_model.norm.weight": ("output_norm.weight", None),
    }
    with safe_open(str(grafted_ckpt / "model.safetensors"), "pt") as f:
        for ours, (theirs, heads) in pairs.items():
            expected = gguf_tensor(theirs)
            if heads is not None:
                expected = torch.from_numpy(unpermute_llama_cpp_rows(expected.numpy(), heads))
            assert_close(f.get_tensor(ours), expected, ours)

        embeddings = f.get_tensor("model.text_model.embed_tokens.weight")  # (49280, 576)
        assert_close(embeddings[:49152], gguf_tensor("token_embd.weight"), "embed_tokens[:49152]")
        assert 0.01 < embeddings[49152:].std() < 0.03  # the added rows: random, small
        lm_head = f.get_tensor("lm_head.weight")
        assert_close(lm_head[:49279], embeddings[:49279], "lm_head[:49279] vs embed_tokens")
        assert_close(lm_head[49279], make_checkpoints.END_OF_UTTERANCE_LOGIT_SCALE * embeddings[2], "lm_head[49279]")
        # The vision tower and connector are random but present at full shape.
        assert f.get_slice("model.connector.modality_projection.proj.weight").get_shape() == [576, 12288]


def test_grafted_checkpoint_answers_in_transformers(grafted_ckpt):
    """Text-only greedy generation with transformers gives a real answer and stops on <end_of_utterance>."""
    from transformers import AutoProcessor, SmolVLMForConditionalGeneration

    processor = AutoProcessor.from_pretrained(grafted_ckpt)
    model = SmolVLMForConditionalGeneration.from_pretrained(grafted_ckpt, dtype=torch.float32)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert processor.decode(batch["input_ids"][0]) == (
        "<|im_start|>User: What is the capital of France?<end_of_utterance>\nAssistant:")
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=20, do_sample=False)
    new_tokens = output[0, batch["input_ids"].shape[1]:].tolist()
    assert new_tokens[-1] == 49279, processor.decode(new_tokens)
    assert processor.decode(new_tokens, skip_special_tokens=True) == " The capital of France is Paris."


# ---------------------------------------------------------------------------------------------
# The builder's cache discipline
# ---------------------------------------------------------------------------------------------


def test_interrupted_build_leaves_nothing(make_checkpoints, tmp_path, monkeypatch):
    def failing_builder(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(make_checkpoints.BUILDERS, "tiny", failing_builder)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_checkpoints.build_atomically("tiny", tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []
