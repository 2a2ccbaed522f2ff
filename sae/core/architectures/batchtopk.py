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
from sae.core.architectures.base import Code
from sae.core.config import OptionError, option
from sae.core.architectures.topk import TopKConfig, TopKFamily


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_lr: float = option(0.01, "EMA rate of the inference threshold")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.threshold_lr <= 1:
            raise OptionError("threshold_lr", f"must be in (0, 1], got {self.threshold_lr!r}")


class BatchTopKSAE(TopKFamily):
    architecture = "batchtopk"
    Config = BatchTopKConfig

    def __init__(self, d_in: int, n_latents: int, **options):
        super().__init__(d_in, n_latents, **options)
        # Kept in float64: EMA updates of a small number lose precision in lower ones.
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def encode_code(self, x: Tensor) -> Code:
        if not self.training:
            pre = self.pre_activations(x)
            return Code(pre.relu() * (pre > self.threshold), None, self.n_total)
        # Sparse (B, cap) codes: per-row candidates, zeroed outside the batch's top B*k.
        values, indices = kernels.batch_topk_encode(x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self.b_dec)
        self._update_threshold(values.detach())
        return Code(values, indices, self.n_total)

    @torch.no_grad()
    def _update_threshold(self, selected: Tensor):
        positive = selected[selected > 0]
        if positive.numel():
            lr = self.cfg.threshold_lr
            self.threshold.mul_(1 - lr).add_(lr * positive.min().double())

    def export_state(self) -> dict[str, Tensor]:
        state = super().export_state()
        state["threshold"] = torch.full_like(self.b_enc, float(self.threshold))
        return state

    def load_export_state(self, state: dict[str, Tensor], extra: dict[str, Tensor] | None = None):
        super().load_export_state(state, extra)
        self.threshold.fill_(float(state["threshold"].max()))

    def saelens_fields(self) -> dict:
        return {"architecture": "jumprelu"}
