"""What a dictionary costs and how it behaves: reconstruction, sparsity and feature density.

All functions take plain tensors, so they serve the trainer's live bar, the end-of-run report and
the eval scripts alike. Conventions follow SAEBench's core eval where a name is shared.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense


class RunningStats:
    """Accumulates reconstruction and sparsity statistics over batches (in float64)."""

    def __init__(self, n_latents: int, device="cpu", b_dec: Tensor | None = None):
        self.n_latents = n_latents
        self.tokens = 0
        self.sums = {k: 0.0 for k in ("sq_err", "l0", "l1", "cos", "l2_ratio", "recon_dot", "recon_sq")}
        self.b_dec = None if b_dec is None else b_dec.detach().double()
        self.x_sum = None
        self.x_sq_sum = 0.0
        self.fire_counts = torch.zeros(n_latents, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor):
        x, x_hat, codes = x.double(), x_hat.double(), codes.double()
        self.tokens += x.shape[0]
        self.sums["sq_err"] += (x - x_hat).pow(2).sum().item()
        self.sums["l0"] += (codes > 0).sum().item()
        self.sums["l1"] += codes.abs().sum().item()
        self.sums["cos"] += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum().item()
        self.sums["l2_ratio"] += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        if self.b_dec is not None:  # for `shrinkage`: how far the codes fall short of the data
            centred_x, centred_hat = x - self.b_dec.to(x.device), x_hat - self.b_dec.to(x.device)
            self.sums["recon_dot"] += (centred_x * centred_hat).sum().item()
            self.sums["recon_sq"] += centred_hat.pow(2).sum().item()
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        self.x_sq_sum += x.pow(2).sum().item()
        self.fire_counts += (codes > 0).sum(0).to(self.fire_counts.device, torch.float64)

    def density(self) -> Tensor:
        return self.fire_counts / max(self.tokens, 1)

    def log_density(self) -> Tensor:
        """log10 feature density (SAELens' sparsity.safetensors); -10 for latents that never fired."""
        density = self.density()
        return torch.where(density > 0, density.clamp_min(1e-10).log10(), torch.full_like(density, -10.0))

    def summary(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        # Total variance about the mean: sum ||x||^2 - n ||mean||^2.
        total_var = self.x_sq_sum - (self.x_sum.pow(2).sum().item() / n if self.x_sum is not None else 0.0)
        fvu = self.sums["sq_err"] / total_var if total_var > 0 else math.nan
        density = self.density()
        return {
            "tokens": self.tokens,
            "mse": self.sums["sq_err"] / n,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "cossim": self.sums["cos"] / n,
            "l2_ratio": self.sums["l2_ratio"] / n,
            "l0": self.sums["l0"] / n,
            "l1": self.sums["l1"] / n,
            "dead_share": (density == 0).float().mean().item(),
            "dense_share": (density > DENSE_THRESHOLD).float().mean().item(),
            # The single rescale of x_hat - b_dec that best fits x - b_dec: 1 when codes have their
            # true size; well above 1 when a penalty shrinks them (an L1's soft-threshold).
            "shrinkage": (self.sums["recon_dot"] / self.sums["recon_sq"] if self.sums["recon_sq"] > 0 else math.nan)
            if self.b_dec is not None else math.nan,
        }


@torch.no_grad()
def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained of one batch: squared error over variance about the mean
    (RunningStats gives the same over many batches, in float64)."""
    err = (x - x_hat).float().pow(2).sum()
    var = (x - x.mean(0)).float().pow(2).sum().clamp_min(1e-12)
    return (err / var).item()


def batch_metrics(x: Tensor, x_hat: Tensor, l0: Tensor) -> dict[str, float]:
    """Cheap per-step numbers for the progress bar: FVU of this batch and mean L0."""
    return {"fvu": fvu(x, x_hat), "l0": float(l0)}


def density_histogram(log_density: Tensor, bins: int = 20, low: float = -10.0, high: float = 0.0) -> dict:
    """Histogram of log10 feature densities; never-firing latents land in the lowest bin."""
    counts = torch.histc(log_density.float().clamp(low, high), bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return {"edges": [round(e, 4) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}


@torch.no_grad()
def evaluate(model, batches, device="cpu") -> tuple[dict[str, float], Tensor]:
    """Run `model` (in eval mode) over an iterable of (B, d_in) batches, or of (x, target) pairs for
    a transcoder (reconstruction is then measured against the target); return (metrics, log10 density)."""
    was_training = model.training
    model.eval()
    stats = RunningStats(model.n_total, b_dec=model.b_dec)
    try:
        for batch in batches:
            x, y = (t.to(device) for t in batch) if isinstance(batch, (tuple, list)) else (batch.to(device),) * 2
            out = model(x)
            stats.update(y, out.x_hat, out.codes)
    finally:
        model.train(was_training)
    metrics = stats.summary()
    log_density = stats.log_density()
    metrics["density_histogram"] = density_histogram(log_density)
    return metrics, log_density
