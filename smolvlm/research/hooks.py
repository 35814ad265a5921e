"""Hook points by name: list them, capture their values, replace them.

A hook function is `fn(tensor, name) -> tensor | None`: it sees the value at that point (a module's
output, or a HookPoint's value) and returns a replacement, or None to leave it. Under the hood it is
a PyTorch forward hook on the module of that name, registered for the `with` block only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]
Names = Iterable[str] | Callable[[str], bool] | None

WEIGHTS_SUFFIX = ".self_attn.weights"  # attention probabilities: (B, H, T, T) each, only when named


def hook_names(model: nn.Module) -> list[str]:
    """Every hook point of `model`: the names (as `named_modules()`: the checkpoint's prefixes) of
    the modules a forward pass calls, and its HookPoints. Containers that are never called
    themselves (`model`, the `layers` lists) are not hook points. Order: `named_modules()`'s."""
    return list(_modules(model))


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and type(m).forward is not nn.Module.forward}


def _unknown(name: str, known: dict[str, nn.Module]) -> KeyError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; model.hook_names() lists them"
    return KeyError(f"no hook point named {name!r}{hint}")


def is_research_hook(hook: object) -> bool:
    """Whether a registered forward hook was put there by `hooks` / `run_with_cache`."""
    return getattr(hook, "smolvlm_research", False)


def active_research_hooks(model: nn.Module) -> list[str]:
    """Names of the hook points that `hooks` / `run_with_cache` are hooking now."""
    return [
        name for name, module in model.named_modules()
        if any(is_research_hook(h) for h in module._forward_hooks.values())
    ]


@contextmanager
def hooks(model: nn.Module, fns: dict[str, HookFn]) -> Iterator[None]:
    """Within the block, each `fns[name](tensor, name)` sees the value at hook point `name` and may
    return its replacement (None keeps it). Unknown names raise KeyError before anything is hooked;
    the hooks are removed when the block ends, however it ends."""
    known = _modules(model)
    for name in fns:
        if name not in known:
            raise _unknown(name, known)
        if not callable(fns[name]):
            raise TypeError(f"the hook for {name!r} must be callable, got {type(fns[name]).__name__}")
    handles = []
    try:
        for name, fn in fns.items():
            handles.append(known[name].register_forward_hook(_forward_hook(name, fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_hook(name: str, fn: HookFn):
    def hook(module, args, output):
        replacement = fn(output, name)
        if replacement is not None and _shapes(replacement) != _shapes(output):
            raise ValueError(
                f"the hook on {name!r} returned {_shapes(replacement)}; it must return None or what it was "
                f"given: {_shapes(output)}"
            )
        return replacement

    hook.smolvlm_research = True  # so the Engine can tell these apart (it refuses them)
    return hook


def _shapes(value):
    """A tensor's shape, or a tuple of them for a tuple output (rotary_emb gives (cos, sin))."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple):
        return tuple(_shapes(v) for v in value)
    return type(value).__name__


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else tuple(_detached(v) for v in value)


class Cache(dict):
    """Hook point name -> the tensor seen there. A missing attention-probability entry explains itself."""

    def __missing__(self, name: str):
        if name.endswith(WEIGHTS_SUFFIX):
            raise KeyError(f"{name!r}: attention probabilities are captured only when named (names=[{name!r}, ...])")
        raise KeyError(f"{name!r} was not captured (not a hook point, or left out by `names`)")


def _selected(names: Names, known: dict[str, nn.Module]) -> list[str]:
    if names is None:  # everything but the attention probabilities ((B, H, T, T) per layer: ask for them)
        return [n for n in known if not n.endswith(WEIGHTS_SUFFIX)]
    if callable(names):
        return [n for n in known if names(n)]
    if isinstance(names, str):
        names = [names]
    chosen = list(names)
    for name in chosen:
        if name not in known:
            raise _unknown(name, known)
    return chosen


def run_with_cache(
    model: nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    names: Names = None,
    **forward_options,
) -> tuple[torch.Tensor, Cache]:
    """`model(input_ids, pixel_values, pixel_attention_mask, **forward_options)` -> (logits, cache):
    cache[name] is the value at each hook point. `names`: a list of names, or a predicate on the
    name; None = every hook point except the attention probabilities (name those to get them).
    Capturing changes nothing: the logits are bit-identical to a plain call's. A point reached
    several times in one pass would keep its last value (none is, in SmolVLM.forward)."""
    known = _modules(model)
    cache = Cache()

    def keep(tensor: torch.Tensor, name: str) -> None:
        cache[name] = _detached(tensor)

    with hooks(model, {name: keep for name in _selected(names, known)}):
        logits = model(input_ids, pixel_values, pixel_attention_mask, **forward_options)
    return logits, cache
