"""Research affordances: name, capture and change any activation of a SmolVLM forward pass.

    names = hook_names(model)                                   # every hook point
    logits, cache = run_with_cache(model, input_ids, pixel_values, names=lambda n: n.endswith("mlp"))
    with hooks(model, {"model.connector": lambda x, name: torch.zeros_like(x)}):
        logits = model(input_ids, pixel_values)                 # the image ablated

Also as methods: `model.hook_names()`, `model.run_with_cache(...)`, `model.hooks({...})`.
Hook points are the modules (checkpoint names) plus the `HookPoint`s of `smolvlm/hookpoint.py`.
Plain PyTorch forward hooks underneath: nothing here changes the model outside a `hooks` block.
See docs/research.md.
"""

from smolvlm.research.hooks import Cache, hook_names, hooks, run_with_cache

__all__ = ["Cache", "hook_names", "hooks", "run_with_cache"]
