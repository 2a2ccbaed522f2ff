"""The matrix-binding SAE: one shared dictionary D and a learned d x d transform per slot.

    W_dec = [D; M_2 D; ...; M_S D]          x_hat = sum_s (z_s D) M_s^T + b_dec,   M_1 = I

Codes split into S blocks of n latents (slot s owns latents s*n ... s*n + n - 1). The encoder is
unconstrained (S*n latents) and the sparsity rule is a component, any of RULES:
BindingSAE(..., sparsity=TopK(k=8)), or by name with flat options, BindingSAE(..., k=8).
Decoding never materialises M_s D: S sparse decodes against D, then S - 1 d x d
products (kernels.binding_decode). `slot_group_sizes` makes D a Matryoshka dictionary: every prefix
of its atoms, in every slot, is trained to reconstruct on its own. See ../shared/binding.md for the
idea and what is identifiable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sae.core import kernels
from sae.core.architectures.base import SAE, Code, SAEConfig
from sae.core.architectures.batchtopk import BatchTopK
from sae.core.architectures.jumprelu import JumpReLU
from sae.core.architectures.relu import ReLU
from sae.core.architectures.topk import TopK, TopKPerSlot
from sae.core.config import OptionError, option

TRANSFORMS = ("orthogonal", "full", "identity")
TRANSFORM_INITS = ("identity", "random_orthogonal", "near_identity")
RULES = {rule.name: rule for rule in (TopK, TopKPerSlot, BatchTopK, ReLU, JumpReLU)}


@dataclass
class BindingConfig(SAEConfig):
    n_slots: int = option(2, "binding slots S (codes have n_slots * n_latents entries)")
    sparsity: str = option("topk", "sparsity rule: topk, topk_per_slot, batchtopk, relu or jumprelu")
    slot_transform: str = option("orthogonal", "M_s parametrisation: orthogonal, full, or identity (bag control)")
    transform_init: str = option("identity", "M_s at initialisation: identity, random_orthogonal or near_identity")
    slot_group_sizes: list[int] = field(default_factory=list, metadata={
        "help": "Matryoshka inside every slot: atoms per nested group, summing to n_latents (empty = off)"})

    @property
    def n_total(self) -> int:
        return self.n_slots * self.n_latents

    def __post_init__(self):
        if not isinstance(self.n_slots, int) or self.n_slots < 2:
            raise OptionError("n_slots", f"must be an integer >= 2, got {self.n_slots!r}")
        for name, allowed in (("slot_transform", TRANSFORMS), ("transform_init", TRANSFORM_INITS)):
            if getattr(self, name) not in allowed:
                raise OptionError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        super().__post_init__()
        groups = self.slot_group_sizes
        if groups and (any(not isinstance(g, int) or g <= 0 for g in groups) or sum(groups) != self.n_latents):
            raise OptionError("slot_group_sizes", f"must be positive integers summing to n_latents={self.n_latents}, "
                              f"got {groups}")


class BindingSAE(SAE):
    """BindingSAE(d_in, n_latents, n_slots=2, sparsity=TopK(k=...), slot_transform=...)."""

    architecture = "binding"
    Config = BindingConfig
    rules = RULES

    # ---- decoder structure ---------------------------------------------------------------------
    def init_decoder(self):
        cfg = self.cfg
        self.dictionary = nn.Parameter(self._random_rows(cfg.n_latents, cfg.d_in))
        n_free, d = cfg.n_slots - 1, cfg.d_in
        if cfg.slot_transform == "identity":
            self.register_buffer("transform_param", torch.zeros(n_free, d, d))
            return
        start = initial_transforms(cfg.transform_init, n_free, d)
        if cfg.slot_transform == "full":
            self.transform_param = nn.Parameter(start)
        else:  # orthogonal: M = R0 exp(A - A^T), A starts at 0 so M starts at R0, exactly orthogonal
            self.register_buffer("transform_base", start)
            self.transform_param = nn.Parameter(torch.zeros(n_free, d, d))

    def decoder_rows(self) -> nn.Parameter:
        return self.dictionary

    def free_transforms(self) -> Tensor:
        """(S-1, d, d): M_2 ... M_S."""
        kind = self.cfg.slot_transform
        if kind == "identity":
            eye = torch.eye(self.d_in, device=self.dictionary.device, dtype=self.dictionary.dtype)
            return eye.expand(self.cfg.n_slots - 1, -1, -1)
        if kind == "full":
            return self.transform_param
        skew = self.transform_param - self.transform_param.transpose(1, 2)
        return self.transform_base @ torch.linalg.matrix_exp(skew.float()).to(self.transform_param.dtype)

    @property
    def slot_transforms(self) -> Tensor:
        """(n_slots, d, d): M_1 = I, then the learned transforms."""
        eye = torch.eye(self.d_in, device=self.dictionary.device, dtype=self.dictionary.dtype)
        return torch.cat([eye[None], self.free_transforms()])

    def flat_decoder(self) -> Tensor:
        """[D; M_2 D; ...] as (n_slots * n_latents, d_in) rows: for export, never on the hot path."""
        return torch.cat([self.dictionary] + [self.dictionary @ m.T for m in self.free_transforms()])

    @property
    def W_dec(self) -> Tensor:
        return self.flat_decoder()

    def slot_codes(self, codes: Tensor) -> Tensor:
        """(B, n_slots * n_latents) -> (B, n_slots, n_latents)."""
        return codes.reshape(codes.shape[0], self.cfg.n_slots, self.cfg.n_latents)

    # ---- decoding ------------------------------------------------------------------------------
    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        return kernels.binding_decode(values, indices, self.dictionary, self.free_transforms())

    def decode_dense(self, codes: Tensor) -> Tensor:
        per_slot = self.slot_codes(codes) @ self.dictionary  # (B, S, d): z_s D
        out = per_slot[:, 0]
        for s, m in enumerate(self.free_transforms(), start=1):
            out = out + per_slot[:, s] @ m.T
        return out

    # ---- Matryoshka inside each slot ---------------------------------------------------------
    def extra_losses(self, x: Tensor, x_hat: Tensor, code: Code) -> dict[str, Tensor]:
        # Every prefix of D (atoms 0..p-1, in every slot through its M_s) must reconstruct x alone,
        # as MatryoshkaSAE asks of a flat dictionary; one masked binding decode per proper prefix.
        losses = super().extra_losses(x, x_hat, code)
        prefixes = torch.tensor(self.cfg.slot_group_sizes).cumsum(0).tolist()[:-1]
        if prefixes:
            losses["prefix_mse"] = sum((self.decode_prefix(code, p) - x).pow(2).sum(-1).mean() for p in prefixes)
        return losses

    def decode_prefix(self, code: Code, prefix: int) -> Tensor:
        """Reconstruction from atoms 0..prefix-1 alone, in every slot."""
        if code.is_sparse:
            keep = code.indices % self.n_latents < prefix
            return self.decode_sparse(code.values * keep, code.indices) + self.b_dec
        keep = torch.arange(self.n_latents, device=code.values.device) < prefix
        masked = self.slot_codes(code.values) * keep
        return self.decode_dense(masked.reshape(code.values.shape)) + self.b_dec

    @torch.no_grad()
    def aux_decoder_rows(self, latents: Tensor) -> Tensor:
        # Detached: a dead latent's row M_s d_a shares d_a (and M_s) with live latents, so AuxK
        # trains only its encoder, to fire where its structured direction explains the residual.
        slot, atom = latents // self.n_latents, latents % self.n_latents
        rows = self.dictionary[atom]
        for s, m in enumerate(self.free_transforms(), start=1):
            rows = torch.where((slot == s)[:, None], rows @ m.T, rows)
        return rows

    def decoder_norms(self) -> Tensor:
        if self.cfg.slot_transform == "full":
            return self.flat_decoder().norm(dim=1)
        return self.dictionary.norm(dim=1).repeat(self.cfg.n_slots)  # orthogonal M keeps norms

    # ---- training-time weight handling ---------------------------------------------------------
    @torch.no_grad()
    def fold_activation_scale_(self, scale: float):
        # x_hat is linear in D (M_s fixed), so scaling D alone rescales every slot's atoms.
        self.W_enc.mul_(scale)
        self.b_dec.div_(scale)
        self.dictionary.div_(scale)

    # ---- export --------------------------------------------------------------------------------
    extra_weights_file = "binding_weights.safetensors"

    def export_extra(self) -> dict[str, Tensor]:
        """The structure a flat W_dec loses: D and the transform parameters (exact reload)."""
        extra = {"dictionary": self.dictionary, "slot_transforms": self.slot_transforms}
        if self.cfg.slot_transform != "identity":
            extra["transform_param"] = self.transform_param
        if self.cfg.slot_transform == "orthogonal":
            extra["transform_base"] = self.transform_base
        return extra

    @torch.no_grad()
    def load_decoder(self, W_dec: Tensor, extra: dict[str, Tensor] | None):
        needed = set(self.export_extra())
        if extra is None or not needed <= set(extra):
            raise ValueError(f"{self.extra_weights_file} must hold {', '.join(sorted(needed))}")
        self.dictionary.copy_(extra["dictionary"])
        if self.cfg.slot_transform != "identity":
            self.transform_param.copy_(extra["transform_param"])
        if self.cfg.slot_transform == "orthogonal":
            self.transform_base.copy_(extra["transform_base"])
        # W_dec is derived; a mismatch means the two files do not belong together.
        if not torch.allclose(self.flat_decoder(), W_dec.to(self.dictionary), rtol=1e-4, atol=1e-5):
            raise ValueError("W_dec in sae_weights.safetensors does not match the dictionary and slot transforms")


def initial_transforms(kind: str, n: int, d: int) -> Tensor:
    if kind == "identity":
        return torch.eye(d).repeat(n, 1, 1)
    if kind == "random_orthogonal":
        q, r = torch.linalg.qr(torch.randn(n, d, d))
        return q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]  # Haar-distributed
    return torch.eye(d) + 0.01 * torch.randn(n, d, d)  # near_identity
