"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, ReLU, nothing else.

Sparsity is exact, so there is no penalty to tune. Latents that stop firing are revived by AuxK:
the dead latents' own top-k_aux pre-activations are asked to reconstruct the residual x - x_hat.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sae.core import kernels
from sae.core.architectures.base import SAE, Code, SAEConfig
from sae.core.config import OptionError, option


@dataclass
class TopKConfig(SAEConfig):
    k: int = option(32, "active latents per token")
    aux_k: int = option(0, "AuxK: dead latents used to model the residual (0 = d_in // 2)")
    aux_coeff: float = option(1 / 32, "AuxK loss weight (0 = off)")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.k, int) or not 0 < self.k <= self.n_total:
            raise OptionError("k", f"must be an integer in [1, {self.n_total}], got {self.k!r}")
        for name in ("aux_k", "aux_coeff"):
            if getattr(self, name) < 0:
                raise OptionError(name, f"must be >= 0, got {getattr(self, name)!r}")


class TopKFamily(SAE):
    """Shared by TopK-style SAEs: AuxK on dead latents."""

    def extra_losses(self, x: Tensor, x_hat: Tensor, code: Code) -> dict[str, Tensor]:
        if not self.training or self.cfg.aux_coeff == 0:
            return {}
        dead = self.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return {}
        return {"aux": self.cfg.aux_coeff * self.aux_loss(x, x_hat, dead)}

    def aux_loss(self, x: Tensor, x_hat: Tensor, dead: Tensor) -> Tensor:
        # Only the dead latents' encoder columns and decoder rows are touched: cheap while few are dead.
        aux_k = self.cfg.aux_k or self.d_in // 2
        residual_hat = kernels.auxk_reconstruct(x, self.W_enc, self.b_enc, aux_k, dead,
                                                self.aux_decoder_rows(dead), self.b_dec)
        residual = (x - x_hat).detach()
        # Scaled by the dead share (as SAELens does) so a handful of dead latents is not over-weighted.
        return (residual_hat - residual).pow(2).sum(-1).mean() * min(dead.numel() / aux_k, 1.0)


class TopKSAE(TopKFamily):
    architecture = "topk"
    Config = TopKConfig

    def encode_code(self, x: Tensor) -> Code:
        values, indices = kernels.topk_encode(x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self.b_dec)
        return Code(values, indices, self.n_total)

    def saelens_fields(self) -> dict:
        return {"architecture": "topk", "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
