"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update).

Weighting |z_i| by ||W_dec[i]|| makes the penalty invariant to trading code scale for decoder
scale, so the decoder need not be constrained to unit norm (off by default here).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import SAE, Code, SAEConfig
from .config import option


@dataclass
class ReLUConfig(SAEConfig):
    l1_coeff: float = option(5.0, "weight of the decoder-norm-weighted L1 penalty")
    normalize_decoder: bool = option(False, "keep decoder rows unit-norm (off: the L1 is norm-weighted)")
    decoder_init_norm: float = option(0.1, "norm of decoder rows at initialisation")

    def __post_init__(self):
        super().__post_init__()
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff!r}")


class ReLUSAE(SAE):
    architecture = "relu"
    Config = ReLUConfig

    def encode_code(self, x: Tensor) -> Code:
        return Code(self.pre_activations(x).relu(), None, self.n_total)

    def extra_losses(self, x: Tensor, x_hat: Tensor, code: Code) -> dict[str, Tensor]:
        weighted = code.values * self.decoder_norms()
        return {"sparsity": self.cfg.l1_coeff * weighted.sum(-1).mean()}

    def saelens_fields(self) -> dict:
        return {"architecture": "standard"}
