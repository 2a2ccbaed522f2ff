"""Dictionaries inside a model: run a transformer-lens model with SAEs attached at their hooks, and
get their codes out of the run.

    from sae.lm import attached, run_codes

    with attached(model, {"blocks.1.hook_resid_post": sae}) as run:    # reconstruction in place
        logits = model(tokens)
    run.codes["blocks.1.hook_resid_post"]   # (rows, n_total) codes of the positions replaced
    run.masks["blocks.1.hook_resid_post"]   # (B, T) bool: which positions those rows are
    run.dense("blocks.1.hook_resid_post")   # (B, T, n_total), zeros where nothing was replaced

    codes = run_codes(model, {hook: sae}, tokens)      # codes only, the model left as it is

A transcoder is attached at its pair of hooks, {(input hook, output hook): tc}: it reads the input
hook's rows (left as they are) and replaces the OUTPUT hook's by its prediction, so the output hook
names it in run.codes / run.masks. The input hook must run first in the forward pass.

Options of `attached`:
    error_term   replace x by x_hat + (x - x_hat): the model's output is unchanged (up to float
                 rounding) but runs through the dictionary, which is what makes `edit` a causal
                 intervention on the codes rather than a reconstruction-error experiment
    positions    where to replace: None (every position), a list of positions (negative counts from
                 the end), or a (T,) / (B, T) bool mask; elsewhere the activation stays as it is
    edit         edit(hook, codes) -> codes, applied before decoding (ablate or steer latents)
    replace      False: only read codes, leave every activation as the model made it
    scale        the factor a dictionary under training sees its inputs multiplied by (sae.train
                 scales them; saved dictionaries have it folded in and work on raw activations);
                 for a transcoder a pair (input scale, target scale)
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

from sae.core.architectures.transcoder import is_transcoder
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
             replace: bool = True, scale: float | tuple = 1.0, on_rows: Callable | None = None):
    """Run `model` with dictionaries attached ({hook: sae}, or {(input hook, output hook): transcoder});
    yields a Run holding their codes."""
    _check_widths(model, saes)
    run = Run()
    at = {key[1] if isinstance(key, tuple) else key: sae for key, sae in saes.items()}  # hook replaced -> sae
    reads = {key[0]: key[1] for key in saes if isinstance(key, tuple)}  # transcoder input hook -> output hook
    clash = sorted(set(reads) & set(at))
    if clash or len(at) < len(saes):
        raise ValueError(f"hook {(clash or [k for k in saes])[0]} is given to two dictionaries: attach them in turn")
    inputs: dict = {}  # output hook -> the input rows its transcoder read in this pass

    def read_input(name, x):
        inputs[reads[name]] = x
        return x

    def through_sae(name, x):
        transcoder = name in reads.values()
        sae, source = at[name], inputs.pop(name, None) if transcoder else x
        if source is None:
            raise ValueError(f"the transcoder replacing {name} found no rows of its input hook: that hook must "
                             "come before the output hook in the forward pass")
        s_in, s_out = scale if isinstance(scale, tuple) else (scale, scale)
        dev = next(sae.parameters()).device
        source = source.to(dev, torch.float32) * s_in
        codes = sae.encode(source)

        def decode(codes):  # a transcoder's skip term reads the input rows
            x_hat = sae.decode(codes, source) if transcoder else sae.decode(codes)
            return (x_hat / s_out).to(x.device, x.dtype)

        x_hat = decode(codes)
        if on_rows is not None:
            on_rows(name, x, x_hat, codes)
        error = x - x_hat  # the dictionary's own error, before any edit: edits must not cancel out
        if edit is not None:
            codes = edit(name, codes)
            x_hat = decode(codes)
        run.codes[name] = codes
        if not replace:
            return x
        return x_hat + error if error_term else x_hat

    functions = {**{name: read_input for name in reads}, **{name: through_sae for name in at}}
    with torch.no_grad(), replacing(model, functions, positions, run):
        yield run


def _check_widths(model, saes: dict):
    """Hooks the model has, holding activations as wide as each dictionary's input (and a
    transcoder's output hook as wide as its output)."""
    for key, sae in saes.items():
        if is_transcoder(sae) != isinstance(key, tuple):
            raise ValueError(f"{key}: a transcoder is attached at a pair of hooks (input, output), any other "
                             "dictionary at one hook")
        pairs = [(key, sae.d_in, "d_in")]
        if isinstance(key, tuple):
            pairs = [(key[0], sae.d_in, "d_in"), (key[1], sae.d_out, "d_out")]
        check_hook_names(model, [name for name, _, _ in pairs])
        for name, want, what in pairs:
            width = _hook_width(model, name)
            if width is not None and width != want:
                raise ValueError(f"hook {name} has width {width} but the dictionary attached there has {what}={want}")


def _hook_width(model, name: str) -> int | None:
    """The residual width for residual-stream hooks (where it is known without running the model)."""
    return model.cfg.d_model if name.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post")) else None


@torch.no_grad()
def run_codes(model, saes: dict, tokens: torch.Tensor, positions=None) -> dict[str, torch.Tensor]:
    """{hook: (rows, n_total) codes} of each dictionary on the clean model's activations at the
    positions selected (row-major: sequence, then position). The forward pass stops after the
    last block a hook needs; nothing in the model is replaced."""
    _check_widths(model, saes)
    reads = {key: key[0] if isinstance(key, tuple) else key for key in saes}  # a transcoder encodes its input hook
    acts = hook_activations(model, tokens, list(dict.fromkeys(reads.values())))
    mask = position_mask(positions, *tokens.shape)
    out = {}
    for key, sae in saes.items():
        name = reads[key]
        rows = acts[name][mask.to(acts[name].device)]
        if rows.shape[-1] != sae.d_in:
            raise ValueError(f"hook {name} has width {rows.shape[-1]} but its dictionary has d_in={sae.d_in}")
        out[key] = sae.encode(rows.to(next(sae.parameters()).device, torch.float32))
    return out
