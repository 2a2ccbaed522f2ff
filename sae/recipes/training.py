"""`sae.train`: which recipe trains which model.

A BindingSAE with a transform to find is trained by the binding recipe (bind, split, match,
rebind: recipes/binding.py); everything else, and a binding SAE with binding_recipe="plain", by the
plain loop (core/trainer.py), which knows nothing of recipes. This is also where the loss-recovered
evaluation (splice_every) is attached: it runs a language model, which the core does not load.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from sae.core.architectures.base import SAE
from sae.core.trainer import TrainResult, make_config, train_loop, train_many as train_set
from sae.lm.splice import splice_monitor
from sae.recipes.binding import train_binding


def train(model: SAE, data, *, target: str | None = None, callback: Callable[[int, dict], None] | None = None,
          metadata: dict | None = None, **options) -> TrainResult:
    """Train `model` on `data` (a (N, d_in) tensor or an activation-cache directory). Options are
    TrainConfig fields; `callback(step, logs)` runs after every optimizer step; `metadata`
    (model_name, hook_name, ...) goes into the saved dictionary's cfg.json (for a cache it defaults
    to the cache's own). With a run_dir, SIGTERM/SIGINT checkpoint and raise TrainingStopped.
    A transcoder reads the `hook` option and reconstructs the hook `target` of the same cache or
    stream; in-memory, its data is the pair (x, y)."""
    cfg = make_config(options)
    make_monitor = splice_monitor(cfg.splice_every, cfg.splice_sequences) if cfg.splice_every else None
    if uses_binding_recipe(model, cfg.binding_recipe):
        return train_binding(model, data, callback=callback, metadata=metadata, make_monitor=make_monitor,
                             **asdict(cfg))
    return train_loop(model, data, target=target, callback=callback, metadata=metadata, make_monitor=make_monitor,
                      **options)


def train_many(models: dict[str, SAE], data, *, hooks: dict[str, str] | None = None,
               targets: dict[str, str] | None = None, callback: Callable | None = None,
               metadata: dict | None = None, **options) -> dict[str, TrainResult]:
    """Train a set of dictionaries (name -> model) on one pass over `data`: each reads its hook's
    batches (`hooks`, name -> hook) and, for a transcoder, its target hook (`targets`). Options are
    TrainConfig fields, shared by the set; with a run_dir each dictionary gets a sub-folder and one
    checkpoint holds them all. Each result is bit-identical (on CPU) to sae.train on it alone."""
    cfg = make_config(options)
    recipe = [name for name, m in models.items() if uses_binding_recipe(m, cfg.binding_recipe)]
    if recipe:
        raise ValueError(f"{', '.join(recipe)}: the binding recipe trains in phases, not in step with a set; "
                         "train it alone with sae.train, or pass binding_recipe='plain'")
    make_monitor = splice_monitor(cfg.splice_every, cfg.splice_sequences) if cfg.splice_every else None
    return train_set(models, data, hooks=hooks, targets=targets, callback=callback, metadata=metadata,
                     make_monitor=make_monitor, **options)


def uses_binding_recipe(model: SAE, recipe: str) -> bool:
    # The identity control has no M to find, so nothing for the recipe to do.
    return model.architecture == "binding" and recipe == "rebind" and model.cfg.slot_transform != "identity"
