"""BatchTopK SAE (Bussmann et al. 2024): keep the B*k largest activations of the whole batch.

Tokens that need more latents get more, at the same average L0. Batch-level selection cannot run
on one token at inference, so training also tracks a threshold (an EMA of the smallest selected
activation) and inference keeps every activation above it: a JumpReLU with one shared threshold,
which is how it is exported for SAELens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.core import kernels
from sae.core.architectures.base import SAE, Code
from sae.core.architectures.topk import TopK
from sae.core.config import OptionError, option


@dataclass
class BatchTopK(TopK):
    """BatchTopK(k=32, aux_k=0, aux_coeff=1/32, threshold_lr=0.01): B*k per batch, AuxK as TopK."""

    name = "batchtopk"
    threshold_lr: float = option(0.01, "EMA rate of the inference threshold")

    def check(self, cfg):
        super().check(cfg)
        if not 0 < self.threshold_lr <= 1:
            raise OptionError("threshold_lr", f"must be in (0, 1], got {self.threshold_lr!r}")

    def init(self, sae: SAE):
        # Kept in float64: EMA updates of a small number lose precision in lower ones.
        sae.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def encode_code(self, sae: SAE, x: Tensor) -> Code:
        if not sae.training:
            pre = sae.pre_activations(x)
            return Code(pre.relu() * (pre > sae.threshold), None, sae.n_total)
        # Sparse (B, cap) codes: per-row candidates, zeroed outside the batch's top B*k.
        values, indices = kernels.batch_topk_encode(x, sae.W_enc, sae.b_enc, self.k, b_dec=sae.input_bias)
        self._update_threshold(sae, values.detach())
        return Code(values, indices, sae.n_total)

    @torch.no_grad()
    def _update_threshold(self, sae: SAE, selected: Tensor):
        positive = selected[selected > 0]
        if positive.numel():
            lr = self.threshold_lr
            sae.threshold.mul_(1 - lr).add_(lr * positive.min().double())

    def export_state(self, sae: SAE) -> dict[str, Tensor]:
        return {"threshold": torch.full_like(sae.b_enc, float(sae.threshold))}

    def load_export_state(self, sae: SAE, state: dict[str, Tensor]):
        sae.threshold.fill_(float(state["threshold"].max()))

    def saelens_fields(self, sae: SAE) -> dict:
        return {"architecture": "jumprelu"}


class BatchTopKSAE(SAE):
    """BatchTopKSAE(d_in, n_latents, k=32, threshold_lr=0.01, ...): a flat dictionary, BatchTopK codes."""

    architecture = "batchtopk"
    rules = {"batchtopk": BatchTopK}
