"""What a sparsity rule is: the component that turns an SAE's pre-activations into codes.

A rule is written once (topk.py, batchtopk.py, relu.py, jumprelu.py) and every SAE has one: a
flat SAE its own (TopKSAE has TopK), a structured one whichever of its `rules` it is given:

    sae.BindingSAE(64, 256, n_slots=2, sparsity=sae.TopK(k=8))
    sae.BindingSAE(64, 256, n_slots=2, sparsity="topk", k=8)      # the same, from flat options

A rule's dataclass fields are its options; the SAE's config reads them through (m.cfg.k), and
cfg.json stores them flat beside the SAE's own. State a rule trains or tracks (JumpReLU's
log_threshold, BatchTopK's threshold) is registered on the SAE itself, after the SAE's own
parameters: names, checkpoints and the order of random initialisation are the SAE's.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:  # annotations only: the base class imports this module
    from sae.core.architectures.base import SAE, Code, SAEConfig


@dataclass
class Sparsity:
    """Base class of sparsity rules; each method gets the SAE it serves."""

    name: ClassVar[str] = ""  # the rule's name in cfg.json (the flat architecture of the same name)
    # SAE-level options whose default this rule changes (the user's value still wins).
    sae_defaults: ClassVar[dict[str, object]] = {}
    # Values the rule derives from the SAE's state, read as the SAE's attributes (m.threshold).
    derived: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def check(self, cfg: SAEConfig) -> None:
        """Refuse options that do not fit the SAE (OptionError names the option)."""

    def init(self, sae: SAE) -> None:
        """Register the rule's parameters and buffers on the SAE."""

    def encode_code(self, sae: SAE, x: Tensor) -> Code:
        raise NotImplementedError

    def losses(self, sae: SAE, x: Tensor, x_hat: Tensor, code: Code, target: Tensor | None = None) -> dict[str, Tensor]:
        """The sparsity penalty ("sparsity") and auxiliary losses; none by default. `target` is
        what x_hat should match when that is not x (a transcoder's output hook)."""
        return {}

    def steer_l0_(self, sae: SAE, log_error_step: float) -> bool:
        """L0 targeting through a lever of the rule's own (see SAE.steer_l0_); False: none."""
        return False

    def export_state(self, sae: SAE) -> dict[str, Tensor]:
        """Tensors saved beside W_enc, W_dec, b_enc, b_dec (SAELens keys)."""
        return {}

    def load_export_state(self, sae: SAE, state: dict[str, Tensor]) -> None:
        pass

    def saelens_fields(self, sae: SAE) -> dict:
        """cfg.json fields SAELens needs for the same codes from a flat W_dec."""
        return {}

    def flat(self, sae: SAE) -> Sparsity:
        """This rule for a flat SAE over all of `sae`'s codes (the binding recipe's split phase)."""
        return self
