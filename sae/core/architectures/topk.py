"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, ReLU, nothing else.

Sparsity is exact, so there is no penalty to tune. Latents that stop firing are revived by AuxK:
the dead latents' own top-k_aux pre-activations are asked to reconstruct the residual x - x_hat.
TopKPerSlot keeps k in every slot of a structured SAE (every block of n_latents codes).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sae.core import kernels
from sae.core.architectures.base import SAE, Code
from sae.core.architectures.sparsity import Sparsity
from sae.core.config import OptionError, option


@dataclass
class TopK(Sparsity):
    """TopK(k=32, aux_k=0, aux_coeff=1/32): the k largest pre-activations per token, and AuxK."""

    name = "topk"
    k: int = option(32, "active latents per token")
    aux_k: int = option(0, "AuxK: dead latents used to model the residual (0 = d_in // 2)")
    aux_coeff: float = option(1 / 32, "AuxK loss weight (0 = off)")

    def check(self, cfg):
        if not isinstance(self.k, int) or not 0 < self.k <= cfg.n_total:
            raise OptionError("k", f"must be an integer in [1, {cfg.n_total}], got {self.k!r}")
        for name in ("aux_k", "aux_coeff"):
            if getattr(self, name) < 0:
                raise OptionError(name, f"must be >= 0, got {getattr(self, name)!r}")

    def encode_code(self, sae: SAE, x: Tensor) -> Code:
        values, indices = kernels.topk_encode(x, sae.W_enc, sae.b_enc, self.k, b_dec=sae.b_dec)
        return Code(values, indices, sae.n_total)

    def losses(self, sae: SAE, x: Tensor, x_hat: Tensor, code: Code) -> dict[str, Tensor]:
        if not sae.training or self.aux_coeff == 0:
            return {}
        dead = sae.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return {}
        return {"aux": self.aux_coeff * self.aux_loss(sae, x, x_hat, dead)}

    def aux_loss(self, sae: SAE, x: Tensor, x_hat: Tensor, dead: Tensor) -> Tensor:
        # Only the dead latents' encoder columns and decoder rows are touched: cheap while few are dead.
        aux_k = self.aux_k or sae.d_in // 2
        residual_hat = kernels.auxk_reconstruct(x, sae.W_enc, sae.b_enc, aux_k, dead,
                                                sae.aux_decoder_rows(dead), sae.b_dec)
        residual = (x - x_hat).detach()
        # Scaled by the dead share (as SAELens does) so a handful of dead latents is not over-weighted.
        return (residual_hat - residual).pow(2).sum(-1).mean() * min(dead.numel() / aux_k, 1.0)

    def saelens_fields(self, sae: SAE) -> dict:
        return {"architecture": "topk", "k": self.k, "rescale_acts_by_decoder_norm": False}


@dataclass
class TopKPerSlot(TopK):
    """TopKPerSlot(k=...): k active latents in every slot, i.e. one object's worth of features each."""

    name = "topk_per_slot"

    def encode_code(self, sae: SAE, x: Tensor) -> Code:
        if self.k > sae.n_latents:
            raise ValueError(f"topk_per_slot needs k <= n_latents ({sae.n_latents}), got {self.k}")
        slots = sae.n_total // sae.n_latents
        values, indices = kernels.topk_encode(x, sae.W_enc, sae.b_enc, self.k, b_dec=sae.b_dec, groups=slots)
        return Code(values, indices, sae.n_total)

    def saelens_fields(self, sae: SAE) -> dict:
        return {"architecture": f"{sae.architecture}_topk_per_slot"}  # no flat dictionary has these codes

    def flat(self, sae: SAE) -> TopK:
        return TopK(k=self.k * (sae.n_total // sae.n_latents), aux_k=self.aux_k, aux_coeff=self.aux_coeff)


class TopKSAE(SAE):
    """TopKSAE(d_in, n_latents, k=32, aux_k=0, aux_coeff=1/32, ...): a flat dictionary, TopK codes."""

    architecture = "topk"
    rules = {"topk": TopK}
