"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

The latents are split into groups; every prefix (group 1, groups 1-2, ...) must reconstruct x on
its own. Early latents are pushed to carry general features and later ones refinements, which
counters feature absorption. The sparsity rule is a component, TopK or BatchTopK:
MatryoshkaSAE(..., sparsity=BatchTopK(k=8)), or by name with flat options. Extra cost: one masked
sparse decode per proper prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from sae.core.architectures.base import SAE, Code, SAEConfig
from sae.core.architectures.batchtopk import BatchTopK
from sae.core.architectures.topk import TopK
from sae.core.config import OptionError


@dataclass
class MatryoshkaConfig(SAEConfig):
    group_sizes: list[int] = field(default_factory=list, metadata={
        "help": "latents per nested group, summing to n_latents (empty = n/16, n/16, n/8, n/4, n/2)"})
    sparsity: str = field(default="batchtopk", metadata={"help": "sparsity rule: topk or batchtopk"})

    def __post_init__(self):
        super().__post_init__()
        if not self.group_sizes:
            n = self.n_latents
            self.group_sizes = [n // 16, n // 16, n // 8, n // 4]
            self.group_sizes.append(n - sum(self.group_sizes))
            self.group_sizes = [g for g in self.group_sizes if g > 0]
        if any(not isinstance(g, int) or g <= 0 for g in self.group_sizes) or sum(self.group_sizes) != self.n_latents:
            raise OptionError("group_sizes", f"must be positive integers summing to n_latents={self.n_latents}, "
                              f"got {self.group_sizes}")

    @property
    def prefixes(self) -> list[int]:
        """Sizes of the nested dictionaries, smallest first (the last is the whole dictionary)."""
        out, total = [], 0
        for g in self.group_sizes:
            total += g
            out.append(total)
        return out


class MatryoshkaSAE(SAE):
    """MatryoshkaSAE(d_in, n_latents, group_sizes=[...], sparsity=BatchTopK(k=...))."""

    architecture = "matryoshka"
    Config = MatryoshkaConfig
    rules = {"topk": TopK, "batchtopk": BatchTopK}

    def extra_losses(self, x: Tensor, x_hat: Tensor, code: Code) -> dict[str, Tensor]:
        losses = super().extra_losses(x, x_hat, code)
        prefix_losses = [(self.decode_prefix(code, p) - x).pow(2).sum(-1).mean() for p in self.cfg.prefixes[:-1]]
        if prefix_losses:
            losses["prefix_mse"] = sum(prefix_losses)
        return losses

    def decode_prefix(self, code: Code, prefix: int) -> Tensor:
        """Reconstruction from the first `prefix` latents alone."""
        if code.is_sparse:
            return self.decode_sparse(code.values * (code.indices < prefix), code.indices) + self.b_dec
        return code.values[:, :prefix] @ self.W_dec[:prefix] + self.b_dec
