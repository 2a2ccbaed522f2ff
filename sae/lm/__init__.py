"""Language models with their hook names, the cache writer, and dictionaries attached to models.

The public surface for running a model with dictionaries inside it (sae/lm/attach.py):

    from sae.lm import attached, run_codes
    with attached(model, {hook: sae}, error_term=False, positions=None) as run:
        logits = model(tokens)            # run.codes[hook], run.masks[hook], run.dense(hook)
    codes = run_codes(model, {hook: sae}, tokens)[hook]

Importing this package stays light: transformer-lens is imported where a model is built.
"""
from sae.lm.attach import Run, attached, position_mask, reconstruct, replacing, run_codes

__all__ = ["attached", "replacing", "run_codes", "reconstruct", "position_mask", "Run"]
