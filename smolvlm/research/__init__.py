"""Research affordances: name, capture and change any activation of a SmolVLM forward pass.

    names = hook_names(model)                                   # every hook point
    logits, cache = run_with_cache(model, input_ids, pixel_values, names=lambda n: n.endswith("mlp"))
    with hooks(model, {"model.connector": lambda x, name: torch.zeros_like(x)}):
        logits = model(input_ids, pixel_values)                 # the image ablated

    result = generate(model, processor, conversation)          # a plain loop that honours hooks
    heat = attention_to_media(model, result)                   # answer -> image tokens, laid out
    render_image(heat[0], photo).save("heat.png")              # `smolvlm explain` does all this
    logit_lens(model, input_ids, position=-1)                  # top tokens from every layer

Also as methods: `model.hook_names()`, `model.run_with_cache(...)`, `model.hooks({...})`.
Hook points are the modules (checkpoint names) plus the `HookPoint`s of `smolvlm/hookpoint.py`.
Plain PyTorch forward hooks underneath: nothing here changes the model outside a `hooks` block.
See docs/research.md.
"""

from smolvlm.research.explain import MediaHeat, attention_rows, attention_to_media, media_heat, render_image, render_video
from smolvlm.research.generate import Generation, generate
from smolvlm.research.hooks import Cache, hook_names, hooks, run_with_cache
from smolvlm.research.lens import logit_lens

__all__ = [
    "Cache", "Generation", "MediaHeat", "attention_rows", "attention_to_media", "generate", "hook_names", "hooks",
    "logit_lens", "media_heat", "render_image", "render_video", "run_with_cache",
]
