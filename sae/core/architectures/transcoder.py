"""Transcoders (Dunefsky et al. 2024; Ge et al. 2024): a dictionary that reads one hook and writes
another, e.g. an MLP's input (blocks.L.ln2.hook_normalized) and its output (blocks.L.hook_mlp_out).

    pre   = x @ W_enc + b_enc                    x (B, d_in): the input hook; no b_dec subtracted
    z     = rule(pre)                            any standard sparsity rule: TopK, BatchTopK, ReLU, JumpReLU
    y_hat = z @ W_dec + b_dec [+ x @ W_skip.T]   W_dec (n, d_out), b_dec (d_out,): the OUTPUT's bias

b_dec lives in the output space, so nothing is subtracted from the input (SAELens:
apply_b_dec_to_input = False); rules read `input_bias`, None here. SkipTranscoder adds a linear
skip term W_skip (d_out, d_in), starting at zero, which carries the part of the map that is linear
so the latents need not. m(x, y) trains (loss ||y - y_hat||^2 + the rule's, AuxK fitting the
residual y - y_hat); m(x) only predicts. Saved in SAELens' transcoder layout (`saelens_fields`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sae.core.architectures.base import SAE, SAEConfig, SAEOutput
from sae.core.architectures.batchtopk import BatchTopK
from sae.core.architectures.jumprelu import JumpReLU
from sae.core.architectures.relu import ReLU
from sae.core.architectures.topk import TopK
from sae.core.config import OptionError, option

# Our rule -> SAELens' transcoder architecture. BatchTopK infers as a JumpReLU with one shared
# threshold (batchtopk.py); SAELens has no TopK transcoder, so TopK gets a name SAELens refuses
# rather than one it would misread as ReLU codes.
SAELENS_ARCHITECTURES = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder",
                         "batchtopk": "jumprelu_transcoder", "topk": "topk_transcoder"}


@dataclass
class TranscoderConfig(SAEConfig):
    d_out: int = option(0, "width of the target hook (0 = d_in)")
    sparsity: str = option("topk", "sparsity rule: topk, batchtopk, relu or jumprelu")

    def __post_init__(self):
        if self.d_out == 0:
            self.d_out = self.d_in
        if not isinstance(self.d_out, int) or isinstance(self.d_out, bool) or self.d_out <= 0:
            raise OptionError("d_out", f"must be a positive integer, got {self.d_out!r}")
        super().__post_init__()


class Transcoder(SAE):
    """Transcoder(d_in, n_latents, d_out=..., sparsity=TopK(k=...)): x at one hook -> y at another."""

    architecture = "transcoder"
    Config = TranscoderConfig
    rules = {rule.name: rule for rule in (TopK, BatchTopK, ReLU, JumpReLU)}
    has_skip = False

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def input_bias(self) -> Tensor | None:
        return None  # b_dec is the output's bias (module docstring)

    def init_decoder(self):
        # The base made b_dec d_in wide; a transcoder's is the target's width.
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_dec = nn.Parameter(self._random_rows(self.n_total, self.d_out))
        if self.has_skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in))

    @torch.no_grad()
    def reset_encoder(self):
        # The decoder writes the output space, so W_dec^T is no matched filter for the input:
        # random input directions at the decoder rows' norm give pre-activations of the same O(1) size.
        if self.cfg.init_encoder_from_decoder:
            self.W_enc.copy_(self._random_rows(self.n_total, self.d_in).T)
        else:
            super().reset_encoder()

    def pre_activations(self, x: Tensor) -> Tensor:
        return x @ self.W_enc + self.b_enc

    def skip(self, x: Tensor) -> Tensor | float:
        """The linear skip term (0 without one)."""
        return x @ self.W_skip.T if self.has_skip else 0.0

    def decode(self, codes: Tensor, x: Tensor | None = None) -> Tensor:
        """Dense codes -> y_hat (B, d_out); with the input rows x, plus the skip term (as in forward)."""
        return super().decode(codes) + (self.skip(x) if x is not None else 0.0)

    def forward(self, x: Tensor, target: Tensor | None = None) -> SAEOutput:
        self._check_input(x)
        code = self.encode_code(x)
        y_hat = self.decode_code(code) + self.skip(x)
        losses = {}
        if target is not None:
            if target.shape != y_hat.shape:
                raise ValueError(f"target must have shape (batch, {self.d_out}) with the input's batch, "
                                 f"got {tuple(target.shape)} for input {tuple(x.shape)}")
            losses = {"mse": (y_hat - target).pow(2).sum(-1).mean(),
                      **self.sparsity.losses(self, x, y_hat, code, target=target)}
        if self.training:
            self._track_firing(code, x.shape[0])
        return SAEOutput(y_hat, code, losses)

    @torch.no_grad()
    def fold_activation_scale_(self, scale: float, target_scale: float | None = None):
        """Make a transcoder trained on (s x, t y) work on raw (x, y) with identical codes:
        pre = (s x) W + c = x (s W) + c; y_hat = y_hat_trained / t, so decoder and b_dec /= t and
        W_skip *= s / t."""
        t = scale if target_scale is None else target_scale
        self.W_enc.mul_(scale)
        self.decoder_rows().div_(t)
        self.b_dec.div_(t)
        if self.has_skip:
            self.W_skip.mul_(scale / t)

    def export_state(self) -> dict[str, Tensor]:
        return {**super().export_state(), **({"W_skip": self.W_skip} if self.has_skip else {})}

    @torch.no_grad()
    def load_export_state(self, state: dict[str, Tensor], extra: dict[str, Tensor] | None = None):
        super().load_export_state(state, extra)
        if self.has_skip:
            self.W_skip.copy_(state["W_skip"])

    def saelens_fields(self) -> dict:
        """SAELens' transcoder layout: architecture transcoder / skip_transcoder (ReLU),
        jumprelu_transcoder / jumprelu_skip_transcoder (JumpReLU, BatchTopK), d_out, and
        apply_b_dec_to_input false; TopK keeps the TopK SAE's k under topk[_skip]_transcoder."""
        arch = SAELENS_ARCHITECTURES[self.sparsity.name]
        if self.has_skip:
            arch = arch.replace("transcoder", "skip_transcoder")
        return {**self.sparsity.saelens_fields(self), "architecture": arch, "d_out": self.d_out,
                "apply_b_dec_to_input": False}


class SkipTranscoder(Transcoder):
    """SkipTranscoder(d_in, n_latents, d_out=..., sparsity=...): a Transcoder plus W_skip x."""

    architecture = "skip_transcoder"
    has_skip = True


def is_transcoder(model: SAE) -> bool:
    return isinstance(model, Transcoder)
