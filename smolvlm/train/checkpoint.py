"""What training writes: model directories (a merged or fully fine-tuned checkpoint that this project
and transformers load) and training state for `--resume` (safetensors and JSON only, never pickle).

A training-state directory (`OUTPUT/checkpoint-STEP/`):
    trainable.safetensors   the trained parameters, by model name
    optimizer.safetensors   AdamW's moments and step count per parameter (`NAME.exp_avg`, ...)
    rng.safetensors         every process's random-generator state (dropout)
    state.json              the step, the run's settings, the metrics so far
    adapter_config.json + adapter_model.safetensors  (LoRA runs: the adapter as of this step)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class ResumeError(ValueError):
    """A training-state directory that is missing, damaged, or from a different run."""


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # own storage: safetensors refuses tensors that share memory (q/k/v are views of one packed
    # matrix, see text.TextModel.pack_projections)
    return t.detach().to("cpu").contiguous().clone()


def save_model_dir(model: nn.Module, base_dir: str | Path, output: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint directory: the base checkpoint's config, tokenizer and processor files, and
    `model.safetensors` with `model`'s weights (the tied LM head left out, as transformers saves it)."""
    if any(type(m).__name__ == "Int8Linear" for m in model.modules()):
        raise ValueError("the model has int8 weights (quantize='int8'): a checkpoint directory holds the full "
                         "weights; save the model before quantizing it")
    base_dir, output = Path(base_dir), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in WEIGHT_FILES:
            shutil.copy2(f, output / f.name)
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors = {name: _contiguous(p).to(dtype) for name, p in model.named_parameters(remove_duplicate=False)
               if not (tied and name == "lm_head.weight")}
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    return output


def save_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
               state: dict) -> None:
    """Write a training-state directory (atomically: into a temporary name, then renamed)."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n: _contiguous(p) for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    moments = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                moments[f"{names[id(p)]}.{key}"] = _contiguous(torch.as_tensor(value))
    save_file(moments, str(tmp / "optimizer.safetensors"))
    save_file({k: _contiguous(v) for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ResumeError(f"{path} is missing: not a complete training-state directory")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ResumeError(f"{path}: cannot read ({e})") from None


def read_state(directory: Path) -> dict:
    path = directory / "state.json"
    if not path.is_file():
        raise ResumeError(f"{directory} is not a training-state directory (no state.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResumeError(f"{path}: not valid JSON ({e})") from None


def load_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Put the trained parameters and optimizer moments of `directory` back; returns the RNG states."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = _read(directory / "trainable.safetensors")
    if set(saved) != set(trainable):
        diff = sorted(set(saved) ^ set(trainable))
        raise ResumeError(f"{directory}: the trained parameters differ from this run's ({len(diff)} names, e.g. {diff[:3]})")
    moments = _read(directory / "optimizer.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in trainable.items():
            if saved[name].shape != p.shape:
                raise ResumeError(f"{directory}: {name} has shape {list(saved[name].shape)}, this run {list(p.shape)}")
            p.copy_(saved[name])
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            state = {key.removeprefix(name + "."): value for key, value in moments.items() if key.rsplit(".", 1)[0] == name}
            # AdamW keeps its step counter on the CPU; the moments live beside the parameter
            state = {k: v if k == "step" else v.to(p.device) for k, v in state.items()}
            if state:
                optimizer.state[p] = state
    return _read(directory / "rng.safetensors")


def latest_state(output: Path) -> Path | None:
    """The training-state directory of the highest step under `output`, if any."""
    found = []
    for d in output.glob("checkpoint-*"):
        suffix = d.name.removeprefix("checkpoint-")
        if d.is_dir() and suffix.isdigit() and (d / "state.json").is_file():
            found.append((int(suffix), d))
    return max(found)[1] if found else None
