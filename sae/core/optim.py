"""The optimiser: Adam on the device's fused path, and the step that keeps decoder rows unit-norm.

    optimizer = make_optimizer(model, cfg, device)      # cfg: lr, beta1, beta2 (a TrainConfig)
    ...
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(model, optimizer, grad_clip=cfg.grad_clip)

make_optimizer builds torch's fused Adam wherever torch has the kernel (CUDA, and CPU since
torch 2.4: one vectorised pass per parameter instead of ~10 elementwise ops; 68 -> ~35 ms per step
on the d = 768 parameters at 2 CPU threads), else the foreach implementation (the same bits as the
default per-tensor loop, fewer passes). Both are elementwise, so a step is deterministic and a run
resumed from a checkpoint (optimizer.state_dict()) continues bit-identically.

optimizer_step is what follows backward: the gradient component along each unit-norm decoder row
is removed (in place, no rows-sized temporary), the gradient norm optionally clipped, Adam steps,
and the rows are renormalised. With ATen ops on CPU these cannot share one pass over the rows
(projection and renormalisation are 2 passes each, memory-bound, ~10% of Adam's cost at d = 768);
see BENCHMARKS.md for where the step's time goes.
"""
from __future__ import annotations

import torch

try:  # which devices torch has fused optimizer kernels for (private; CPU since torch 2.4)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # an older or future torch without it: fused where it always was
    def _get_fused_kernels_supported_devices():
        return ["cuda"]


def adam_options(params: list[torch.Tensor], device: torch.device) -> dict:
    """{'fused': True} where torch has a fused Adam for these parameters, else {'foreach': True}."""
    if device.type in _get_fused_kernels_supported_devices() and all(
            p.device.type == device.type and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device | str) -> torch.optim.Adam:
    """Adam over model.parameters() with cfg.lr and betas (cfg.beta1, cfg.beta2), on the fastest exact
    path for `device` (fused, else foreach). The model's parameters must already be on `device`."""
    return make_adam(model.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), device)



def make_adam(params, lr: float, betas: tuple[float, float], device: torch.device | str) -> torch.optim.Adam:
    """Adam(params, lr, betas) on the fused path (FusedAdam), else torch's foreach Adam."""
    params = list(params)
    options = adam_options(params, torch.device(device))
    if options.get("fused"):
        return FusedAdam(params, lr=lr, betas=betas)
    return torch.optim.Adam(params, lr=lr, betas=betas, **options)


class FusedAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) (same kernel, state and state_dict) that steps each parameter in
    its memory order.

    torch's CPU kernel makes every gradient row-major first: for W_enc, stored (n, d)-major and seen
    as (d, n), that is a fresh n x d copy every step (~5% of a CPU step at d = 768, most of it page
    faults). Here each parameter, gradient and state tensor, all in the parameter's layout (see
    match_layouts_), is passed as the flat view of its memory, so the kernel touches each element once,
    in place. Results are those of torch's fused Adam: the same elementwise arithmetic on the same
    pairs. Anything the flat path does not cover (tensor lr, amsgrad, grad scaling, a layout that is
    not a permutation of a contiguous one) takes torch's own step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), **kwargs):
        super().__init__(params, lr=lr, betas=betas, fused=True, **kwargs)
        self.register_load_state_dict_post_hook(_after_load)  # checkpoints store state contiguous

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._flat_path_applies():
            return super().step(closure)
        match_layouts_(self)
        batches = []
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
            try:  # torch's own lazy state initialisation (a private method, stable since torch 2.0)
                self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps)
            except TypeError:
                return super().step()
            flat = [[_memory_order(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
            if any(t is None for ts in flat for t in ts):
                return super().step()  # a layout the flat views cannot express (never for an SAE)
            batches.append((group, flat, steps))
        for group, flat, steps in batches:
            if not steps:
                continue
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(*flat, [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                               weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                               maximize=group["maximize"], grad_scale=None, found_inf=None)
        return None

    def _flat_path_applies(self) -> bool:
        return (getattr(self, "grad_scale", None) is None and getattr(self, "found_inf", None) is None
                and all(not g["amsgrad"] and not g["capturable"] and not g["differentiable"]
                        and not g.get("decoupled_weight_decay", False) and not torch.is_tensor(g["lr"])
                        and not torch.is_tensor(g["betas"][0]) for g in self.param_groups))


def _memory_order(t: torch.Tensor) -> torch.Tensor | None:
    """The 1-D view of t's memory (t dense, its strides a permutation of contiguous ones), else None."""
    dims = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    permuted = t.permute(dims)
    return permuted.reshape(-1) if permuted.is_contiguous() else None


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0) -> None:
    """Everything between loss.backward() and the next step: remove the gradient parallel to each
    decoder row, clip the global gradient norm (grad_clip > 0), step, renormalise the decoder rows."""
    model.remove_parallel_grad_()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if optimizer.defaults.get("fused"):
        match_layouts_(optimizer)
    optimizer.step()
    model.normalize_decoder_()


@torch.no_grad()
def match_layouts_(optimizer: torch.optim.Optimizer) -> None:
    """Give every gradient and Adam state tensor its parameter's strides.

    torch's CPU fused Adam (2.13) walks a parameter and its state in memory order but makes the
    gradient row-major: for a transposed parameter (W_enc is stored (n, d)-major) any tensor in
    another layout is paired with the wrong elements, silently. Autograd returns gradients in their
    parameter's layout, but a checkpoint stores state contiguous (safetensors), so after a resume
    exp_avg and exp_avg_sq of W_enc come back row-major: without this, the resumed run diverges.
    Nothing is copied when layouts already match (every step of an uninterrupted run)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(p.grad)
            state = optimizer.state.get(p)
            for key, value in (state or {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)


def _after_load(optimizer: torch.optim.Optimizer) -> None:
    match_layouts_(optimizer)
