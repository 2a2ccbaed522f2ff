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
        dead = self.aux_dead(sae)
        if dead is None:
            values, indices = kernels.topk_encode(x, sae.W_enc, sae.b_enc, self.k, b_dec=sae.input_bias)
            return Code(values, indices, sae.n_total)
        # AuxK's selection comes from the same pre-activations as the codes (no second encoder pass).
        values, indices, aux_values, aux_indices = kernels.topk_encode_aux(
            x, sae.W_enc, sae.b_enc, self.k, dead, self.k_aux(sae), b_dec=sae.input_bias)
        return Code(values, indices, sae.n_total,
                    extras={"aux_dead": dead, "aux_values": aux_values, "aux_indices": aux_indices})

    def aux_dead(self, sae: SAE) -> Tensor | None:
        """Ids of the latents AuxK trains this step (those dead before it), or None when it is off."""
        if not sae.training or self.aux_coeff == 0:
            return None
        dead = sae.dead_mask().nonzero().squeeze(1)
        return dead if dead.numel() else None

    def k_aux(self, sae: SAE) -> int:
        return self.aux_k or sae.d_out // 2  # half the residual's width (d_in but for a transcoder)

    def losses(self, sae: SAE, x: Tensor, x_hat: Tensor, code: Code, target: Tensor | None = None) -> dict[str, Tensor]:
        if "aux_dead" in code.extras:
            dead = code.extras["aux_dead"]
        else:  # an encoder that did not select for AuxK (BatchTopK, per-slot TopK)
            dead = self.aux_dead(sae)
            if dead is None:
                return {}
        return {"aux": self.aux_coeff * self.aux_loss(sae, x, x_hat, dead, code, target)}

    def aux_loss(self, sae: SAE, x: Tensor, x_hat: Tensor, dead: Tensor, code: Code | None = None,
                 target: Tensor | None = None) -> Tensor:
        """The dead latents, encoding x, fit the residual (target, x by default) - x_hat."""
        # Only the dead latents' encoder columns and decoder rows are touched, and only at the
        # k_aux pairs each token selects: decoded sparsely (gather-sum, sorted segment backward).
        aux_k = self.k_aux(sae)
        rows = sae.aux_decoder_rows(dead)
        if code is not None and "aux_values" in code.extras:
            residual_hat = kernels.sparse_decode(code.extras["aux_values"], code.extras["aux_indices"], rows)
        elif rows.shape[1] == x.shape[1]:
            residual_hat = kernels.auxk_reconstruct(x, sae.W_enc, sae.b_enc, aux_k, dead, rows, sae.input_bias)
        else:  # a transcoder's rows write another width than x's, which auxk_reconstruct assumes: the same, unfused
            values, indices = kernels.topk_encode(x, sae.W_enc[:, dead], sae.b_enc[dead], min(aux_k, dead.numel()),
                                                  b_dec=sae.input_bias)
            residual_hat = kernels.sparse_decode(values, indices, rows)
        residual = ((x if target is None else target) - x_hat).detach()
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
        values, indices = kernels.topk_encode(x, sae.W_enc, sae.b_enc, self.k, b_dec=sae.input_bias, groups=slots)
        return Code(values, indices, sae.n_total)

    def saelens_fields(self, sae: SAE) -> dict:
        return {"architecture": f"{sae.architecture}_topk_per_slot"}  # no flat dictionary has these codes

    def flat(self, sae: SAE) -> TopK:
        return TopK(k=self.k * (sae.n_total // sae.n_latents), aux_k=self.aux_k, aux_coeff=self.aux_coeff)


class TopKSAE(SAE):
    """TopKSAE(d_in, n_latents, k=32, aux_k=0, aux_coeff=1/32, ...): a flat dictionary, TopK codes."""

    architecture = "topk"
    rules = {"topk": TopK}
