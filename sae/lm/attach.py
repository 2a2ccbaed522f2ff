"""Running a model with a dictionary attached: the two pieces every splice is made of.

    hook_fn = ReplaceRows(mask, lambda rows: reconstruct(sae, rows, scale)[0])
    model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook_fn)])

`reconstruct` is the dictionary's view of a batch of activation rows; `ReplaceRows` swaps it in at
the token positions a mask selects (the rows a cache would have stored), leaving BOS, padding and
other special tokens as the model made them.
"""
from __future__ import annotations

import torch


def reconstruct(sae, x: torch.Tensor, scale: float = 1.0):
    """(x_hat in x's units, dense codes) for rows x. `scale` is the factor a dictionary under
    training sees its inputs multiplied by (sae.train scales them; the saved one works on raw x)."""
    dev = next(sae.parameters()).device
    out = sae(x.to(dev, torch.float32) * scale)
    return (out.x_hat / scale).to(x.device, x.dtype), out.codes


class ReplaceRows:
    """A transformer-lens hook function: replace the activation's rows at `mask` (B, T) by f(rows).
    Works for any (B, T, ...) hook; trailing dims are flattened for f and restored."""

    def __init__(self, mask: torch.Tensor, f):
        self.mask, self.f = mask, f

    def __call__(self, act, hook=None):
        shape = act.shape
        flat = act.reshape(shape[0], shape[1], -1)
        m = self.mask.to(act.device)
        new = flat.clone()
        new[m] = self.f(flat[m])
        return new.reshape(shape)
