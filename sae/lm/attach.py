"""Dictionaries inside a model: run a transformer-lens model with SAEs attached at their hooks, and
get their codes out of the run.

    from sae.lm import attached, run_codes

    with attached(model, {"blocks.1.hook_resid_post": sae}) as run:    # reconstruction in place
        logits = model(tokens)
    run.codes["blocks.1.hook_resid_post"]   # (rows, n_total) codes of the positions replaced
    run.masks["blocks.1.hook_resid_post"]   # (B, T) bool: which positions those rows are
    run.dense("blocks.1.hook_resid_post")   # (B, T, n_total), zeros where nothing was replaced

    codes = run_codes(model, {hook: sae}, tokens)      # codes only, the model left as it is

Options of `attached`:
    error_term   replace x by x_hat + (x - x_hat): the model's output is unchanged (up to float
                 rounding) but runs through the dictionary, which is what makes `edit` a causal
                 intervention on the codes rather than a reconstruction-error experiment
    positions    where to replace: None (every position), a list of positions (negative counts from
                 the end), or a (T,) / (B, T) bool mask; elsewhere the activation stays as it is
    edit         edit(hook, codes) -> codes, applied before decoding (ablate or steer latents)
    replace      False: only read codes, leave every activation as the model made it
    scale        the factor a dictionary under training sees its inputs multiplied by (sae.train
                 scales them; saved dictionaries have it folded in and work on raw activations)
    on_rows      on_rows(hook, x, x_hat, codes) after each replacement, for running statistics

Several dictionaries at several hooks act together: a later hook sees what the earlier
replacements made. `replacing` is the same mechanism for any row function (zero or mean
ablation); `reconstruct` and `ReplaceRows` are its two pieces, for hand-written hooks.
Hooks are added through the model's own `hooks()` context (transformer-lens 3.x and 4.x), so they
are removed on exit even when the forward pass raises.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from sae.lm.hooked import check_hook_names, hook_activations


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


def position_mask(positions, batch: int, length: int) -> torch.Tensor:
    """(B, T) bool mask from `positions`: None (all), a list of positions (negative = from the
    end), or a (T,) / (B, T) bool mask. Refuses positions or shapes that do not fit the batch."""
    if positions is None:
        return torch.ones(batch, length, dtype=torch.bool)
    if torch.is_tensor(positions) and positions.dtype == torch.bool:
        mask = positions.cpu()
        if mask.shape == (length,):
            return mask[None].expand(batch, length)
        if mask.shape != (batch, length):
            raise ValueError(f"positions mask has shape {tuple(mask.shape)}; the batch is ({batch}, {length})")
        return mask
    pos = [int(p) for p in positions]
    bad = [p for p in pos if not -length <= p < length]
    if bad:
        raise ValueError(f"position {bad[0]} is outside sequences of {length} tokens")
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, [p % length for p in pos]] = True
    return mask


class Run:
    """What `attached` and `replacing` yield: after each forward pass, per hook, the codes of the
    rows replaced (`codes`, row-major over the mask) and the mask (`masks`). Each pass overwrites
    the last one's, so a loop over batches holds one batch's codes at a time."""

    def __init__(self):
        self.codes: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def dense(self, hook: str) -> torch.Tensor:
        """(B, T, n_total) codes of the last pass at `hook`, zeros at positions not replaced."""
        codes, mask = self.codes[hook], self.masks[hook]
        out = codes.new_zeros(*mask.shape, codes.shape[-1])
        out[mask.to(out.device)] = codes
        return out


@contextlib.contextmanager
def replacing(model, functions: dict[str, Callable], positions=None, _run: Run | None = None):
    """Within the block, each forward pass of `model` replaces the activation at every hook in
    `functions` by f(rows) at `positions` (see position_mask); f maps (rows, d) to (rows, d)."""
    check_hook_names(model, list(functions))
    run = _run or Run()

    def hook_fn(name, f):
        def fn(act, hook=None):
            mask = position_mask(positions, act.shape[0], act.shape[1])
            run.masks[name] = mask
            return ReplaceRows(mask, lambda rows: f(name, rows))(act)
        return fn

    with model.hooks(fwd_hooks=[(name, hook_fn(name, f)) for name, f in functions.items()]):
        yield run


@contextlib.contextmanager
def attached(model, saes: dict, *, error_term: bool = False, positions=None, edit: Callable | None = None,
             replace: bool = True, scale: float = 1.0, on_rows: Callable | None = None):
    """Run `model` with dictionaries attached ({hook: sae}); yields a Run holding their codes."""
    _check_widths(model, saes)
    run = Run()

    def through_sae(name, x):
        sae = saes[name]
        dev = next(sae.parameters()).device
        codes = sae.encode(x.to(dev, torch.float32) * scale)
        x_hat = (sae.decode(codes) / scale).to(x.device, x.dtype)
        if on_rows is not None:
            on_rows(name, x, x_hat, codes)
        error = x - x_hat  # the dictionary's own error, before any edit: edits must not cancel out
        if edit is not None:
            codes = edit(name, codes)
            x_hat = (sae.decode(codes) / scale).to(x.device, x.dtype)
        run.codes[name] = codes
        if not replace:
            return x
        return x_hat + error if error_term else x_hat

    with torch.no_grad(), replacing(model, {name: through_sae for name in saes}, positions, run):
        yield run


def _check_widths(model, saes: dict):
    """Hooks the model has, holding activations as wide as each dictionary's input."""
    check_hook_names(model, list(saes))
    for name, sae in saes.items():
        width = _hook_width(model, name)
        if width is not None and width != sae.d_in:
            raise ValueError(f"hook {name} has width {width} but the dictionary attached there has d_in={sae.d_in}")


def _hook_width(model, name: str) -> int | None:
    """The residual width for residual-stream hooks (where it is known without running the model)."""
    return model.cfg.d_model if name.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post")) else None


@torch.no_grad()
def run_codes(model, saes: dict, tokens: torch.Tensor, positions=None) -> dict[str, torch.Tensor]:
    """{hook: (rows, n_total) codes} of each dictionary on the clean model's activations at the
    positions selected (row-major: sequence, then position). The forward pass stops after the
    last block a hook needs; nothing in the model is replaced."""
    _check_widths(model, saes)
    acts = hook_activations(model, tokens, list(saes))
    mask = position_mask(positions, *tokens.shape)
    out = {}
    for name, sae in saes.items():
        rows = acts[name][mask.to(acts[name].device)]
        if rows.shape[-1] != sae.d_in:
            raise ValueError(f"hook {name} has width {rows.shape[-1]} but its dictionary has d_in={sae.d_in}")
        out[name] = sae.encode(rows.to(next(sae.parameters()).device, torch.float32))
    return out
