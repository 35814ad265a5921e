"""LoRA: a trainable low-rank update beside a frozen projection, in PEFT's names and file format.

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling        scaling = alpha / r  (rsLoRA: alpha / sqrt(r))

`lora_A` (r, in) starts random (Kaiming-uniform, as PEFT), `lora_B` (out, r) starts at zero, so a
fresh adapter changes nothing. The wrapper takes the projection's place in the model, so module
names become `...q_proj.base_layer`, `...q_proj.lora_A`, `...q_proj.lora_B`: PEFT's names without
its adapter-name level (`lora_A.default`), which PEFT itself strips when it saves.

An adapter directory is what `peft.PeftModel.save_pretrained` writes and `PeftModel.from_pretrained`
reads: `adapter_config.json` and `adapter_model.safetensors` holding
`base_model.model.<module name>.lora_A.weight` / `.lora_B.weight`. Our module names are
transformers' (`model.text_model.layers.0.self_attn.q_proj`), so nothing is renamed.

Serving merges: `merge_lora` folds W + scaling * B @ A into the projection and puts a plain `Linear`
back, so every inference speed path (fused q/k/v, C decode kernels, CUDA graphs) runs unchanged and a
step costs what it cost without the adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from smolvlm.linear import Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

# The decoder's projections (the published recipes' targets), by the names `--lora-targets` takes.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DECODER_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                   "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# adapter_config.json fields whose non-default values change what the adapter computes, and which
# this implementation does not do: an adapter using them is refused, never half-applied.
_UNSUPPORTED = {
    "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none", "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    "exclude_modules": None, "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
    "use_qalora": False, "alora_invocation_tokens": None,
}
# Fields that say nothing about what the adapter computes (bookkeeping), or that this code reads.
_NEUTRAL = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "megatron_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
            "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights"}
# init_lora_weights values that only choose the starting A and B; "pissa", "olora", "corda", "loftq",
# "eva", ... also rewrite the base weights, so such an adapter added to the original weights is wrong.
_PLAIN_INITS = (True, False, "gaussian")


class AdapterError(ValueError):
    """An adapter directory that cannot be read, or that does not fit the model."""


def decoder_targets(names: list[str] | tuple[str, ...] = DECODER_PROJECTIONS) -> str:
    """A regular expression (PEFT's `target_modules` as a string: a full match of the module name)
    for the named projections of every decoder layer, and nothing in the vision tower."""
    unknown = [n for n in names if n not in _DECODER_PARENT]
    if not names:
        raise AdapterError(f"no LoRA target given: choose among {', '.join(DECODER_PROJECTIONS)}")
    if unknown:
        raise AdapterError(f"unknown LoRA target(s) {unknown}: choose among {', '.join(DECODER_PROJECTIONS)}")
    groups = []
    for parent in ("self_attn", "mlp"):
        chosen = [n for n in DECODER_PROJECTIONS if n in names and _DECODER_PARENT[n] == parent]
        if chosen:
            groups.append(rf"{parent}\.({'|'.join(chosen)})")
    return rf"model\.text_model\.layers\.\d+\.({'|'.join(groups)})"


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    # a regular expression (full match of the module name) or a list of name suffixes, as in PEFT
    target_modules: str | list[str] = field(default_factory=decoder_targets)
    use_rslora: bool = False

    def __post_init__(self):
        if type(self.r) is not int or self.r < 1:
            raise AdapterError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise AdapterError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise AdapterError(f"target_modules is not a valid regular expression ({e})") from None
        elif not isinstance(self.target_modules, list) or not self.target_modules \
                or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AdapterError(f"target_modules must be a regular expression or a list of module names, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, name: str) -> bool:
        """PEFT's rule: a string is a full-match regex; a list names modules by their last components."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def to_peft(self, base_model: str) -> dict:
        """adapter_config.json, with the fields `peft.PeftConfig.from_pretrained` needs."""
        # only fields PEFT has known for a long time, so older PEFT versions read it too
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": self.r,
            "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout, "target_modules": self.target_modules,
            "use_rslora": self.use_rslora, "init_lora_weights": True, "inference_mode": True, "bias": "none",
            "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, config: dict, where: str) -> LoraConfig:
        if not isinstance(config, dict):
            raise AdapterError(f"{where}: expected a JSON object")
        if config.get("peft_type") != "LORA":
            raise AdapterError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
        for key, value in config.items():  # anything set that may change the computation is refused
            if key not in _NEUTRAL and value not in (None, {}, [], False, "none"):
                known = "is not supported" if key in _UNSUPPORTED else "is a field this implementation does not know"
                raise AdapterError(f"{where}: {key}={value!r} {known} (plain LoRA only; refused rather than half-applied)")
        if config.get("init_lora_weights", True) not in _PLAIN_INITS:
            raise AdapterError(f"{where}: init_lora_weights={config['init_lora_weights']!r} also changes the base weights "
                               "(convert the adapter to plain LoRA with PEFT first); plain LoRA only")
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
        if missing:
            raise AdapterError(f"{where}: missing {', '.join(missing)}")
        return cls(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config.get("lora_dropout", 0.0) or 0.0,
                   target_modules=config["target_modules"], use_rslora=bool(config.get("use_rslora", False)))


class LoraLinear(nn.Module):
    """A Linear with a low-rank update beside it. `base_layer` is the original module, unchanged."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        dtype = dtype or weight.dtype  # an fp32 adapter on a bf16 model keeps its precision until merged
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out); same order of operations as PEFT's lora.Linear.forward
        result = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), computed in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def add_lora(model: nn.Module, config: LoraConfig, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every Linear whose name `config` matches; returns the wrapped names. Freezes nothing:
    the caller decides what trains (`smolvlm.train.train` freezes everything but the adapters)."""
    if any(type(m).__name__ == "Int8Linear" for m in model.modules()):
        raise AdapterError("the model has int8 weights (quantize='int8'): LoRA trains on the checkpoint's own "
                           "weights; load it without quantize")
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and config.matches(name)]
    if not targets:
        raise AdapterError(f"target_modules {config.target_modules!r} matches no Linear module of the model")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head" in targets:
        raise AdapterError("lm_head shares its weight with the token embeddings (tie_word_embeddings): "
                           "a LoRA on it cannot be merged; leave it out of target_modules")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(getattr(parent, child), config.r, config.scaling, config.lora_dropout, dtype))
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA into its projection and put the projection back in the wrapper's place.
    Returns how many were merged. The merged weight is a new tensor (W + scaling * B @ A, summed in
    fp32, then cast to W's dtype): the original weight is not written to."""
    merged = 0
    for name, wrapper in lora_modules(model).items():
        base = wrapper.base_layer
        new = (base.weight.float() + wrapper.delta_weight().to(base.weight.device)).to(base.weight.dtype)
        base.weight = nn.Parameter(new, requires_grad=base.weight.requires_grad)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
        merged += 1
    text_model = getattr(getattr(model, "model", None), "text_model", None)
    if merged and hasattr(text_model, "pack_projections"):
        text_model.pack_projections()  # merged q/k/v (gate/up) back to back for the fused decode products
    return merged


def save_adapter(model: nn.Module, directory: str | Path, config: LoraConfig, base_model: str) -> Path:
    """Write `model`'s LoRA weights and `config` as a PEFT adapter directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            # contiguous copies: safetensors refuses tensors that share storage
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(m, part).weight.detach().to("cpu").contiguous().clone()
    if not tensors:
        raise AdapterError("the model has no LoRA modules to save")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft(base_model), indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> LoraConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{directory} is not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    return LoraConfig.from_peft(raw, str(path))


def load_adapter(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> LoraConfig:
    """Wrap the adapter's target modules in `model` and fill them from the adapter's weights, strictly:
    every tensor used, every LoRA module filled, every shape as the config says. `dtype`: of the
    LoRA weights (default: each projection's; float32 to merge into a bf16 model without rounding
    the adapter first)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS}" + (
            " (adapter_model.bin is a pickle; this project reads safetensors only)" if (directory / "adapter_model.bin").exists() else ""))
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{weights}: cannot read safetensors file ({e})") from None
    if lora_modules(model):
        raise AdapterError("the model already has LoRA modules; load one adapter into a fresh model")
    # Check everything before the model is touched: a bad adapter leaves it as it was.
    expected = {}  # key -> shape
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and config.matches(name):
            expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (config.r, m.in_features)
            expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, config.r)
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    for key in sorted(set(expected) & set(state)):
        if tuple(state[key].shape) != expected[key]:
            problems.append(f"{key}: adapter {list(state[key].shape)} vs model {list(expected[key])}")
        elif not state[key].is_floating_point():
            problems.append(f"{key}: non-float dtype {state[key].dtype}")
    if problems:
        raise AdapterError(f"adapter {directory} does not fit the model:\n  " + "\n  ".join(problems[:20]))
    add_lora(model, config, dtype)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                getattr(m, part).weight.copy_(state[f"{PEFT_PREFIX}{name}.{part}.weight"])
    return config
