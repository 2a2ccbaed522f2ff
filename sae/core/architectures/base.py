"""The base class every SAE shares: parameters, encode/decode, loss parts, decoder-norm handling.

An SAE maps x (B, d_in) to codes z (B, n_total) and back:
    pre   = (x - b_dec) @ W_enc + b_enc          (SAELens orientation: W_enc is (d_in, n_total))
    z     = activation(pre)                      (the sparsity rule: a component, sparsity.py)
    x_hat = z @ W_dec + b_dec                    (W_dec is (n_total, d_in); structured SAEs override)
Codes travel as a `Code`: sparse (values, indices) for the TopK family, so the hot path never builds
a B x n dense tensor, or dense (B, n_total) when the number of active latents varies per row.
An architecture is a decoder structure (flat here; binding.py, matryoshka.py) and the sparsity
rules it takes (`rules`): a flat SAE takes one, TopKSAE is SAE + TopK.
"""
from __future__ import annotations

import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from sae.core import io, kernels
from sae.core.architectures.registry import ARCHITECTURES
from sae.core.architectures.sparsity import Sparsity
from sae.core.config import OptionError, option


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    # Unit-norm rows stop the SAE buying sparsity by shrinking codes and growing the decoder.
    normalize_decoder: bool = option(True, "keep decoder rows unit-norm (parallel gradient removed)")
    # Latents begin as matched-filter detectors of their own atoms.
    init_encoder_from_decoder: bool = option(True, "initialise W_enc as W_dec^T")
    decoder_init_norm: float = option(1.0, "norm of decoder rows at initialisation")
    dead_tokens: int = option(10_000_000, "a latent silent for this many training tokens counts as dead (AuxK, dead share)")
    # The SAE's sparsity rule, whose options read through: cfg.k is cfg.rule.k (set by the SAE).
    rule: Sparsity | None = None

    @property
    def n_total(self) -> int:
        return self.n_latents

    def __getattr__(self, name: str):  # reached only for names that are not fields
        rule = self.__dict__.get("rule")
        if rule is not None and name in rule.option_names():
            return getattr(rule, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value):
        rule = self.__dict__.get("rule")
        object.__setattr__(rule if rule is not None and name in rule.option_names() else self, name, value)

    def __post_init__(self):
        for name in ("d_in", "n_latents", "dead_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OptionError(name, f"must be a positive integer, got {value!r}")
        if not self.decoder_init_norm > 0:
            raise OptionError("decoder_init_norm", f"must be > 0, got {self.decoder_init_norm!r}")


@dataclass
class Code:
    """Codes for a batch: sparse (values, indices), each (B, k), or dense values (B, n_total)."""

    values: Tensor
    indices: Tensor | None
    n_total: int
    # Architecture-specific by-products of encoding that losses need (e.g. JumpReLU's L0).
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    def dense(self) -> Tensor:
        if self.indices is None:
            return self.values
        zeros = self.values.new_zeros(self.values.shape[0], self.n_total)
        return zeros.scatter(1, self.indices, self.values)

    def active(self) -> Tensor:
        """(n_total,) bool: which latents fired (value > 0) anywhere in the batch."""
        if self.indices is None:
            return (self.values > 0).any(0)
        fired = torch.zeros(self.n_total, dtype=torch.bool, device=self.values.device)
        return fired.index_fill_(0, self.indices[self.values > 0], True)

    def l0(self) -> Tensor:
        """Mean number of active latents per row."""
        return (self.values > 0).sum(-1).float().mean()


@dataclass
class SAEOutput:
    x_hat: Tensor
    code: Code
    # Named loss parts, already weighted; `loss` is their sum. "sparsity" is the part a
    # sparsity-coefficient warm-up scales.
    losses: dict[str, Tensor]

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())

    @property
    def codes(self) -> Tensor:
        return self.code.dense()


class SAE(nn.Module):
    """Base class. Subclasses set `architecture`, `Config` (the decoder structure's options) and
    `rules` (name -> sparsity rule; a structured Config's `sparsity` field names the default)."""

    architecture: ClassVar[str] = ""
    Config: ClassVar[type[SAEConfig]] = SAEConfig
    rules: ClassVar[dict[str, type[Sparsity]]] = {}
    registry: ClassVar[dict[str, type[SAE]]] = ARCHITECTURES

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("architecture"):
            SAE.registry[cls.architecture] = cls

    def __init__(self, d_in: int, n_latents: int, sparsity: Sparsity | str | None = None, **options):
        super().__init__()
        self.sparsity = self.make_sparsity(sparsity, options)  # takes the rule's options out of `options`
        known = {f.name for f in fields(self.Config)} - {"d_in", "n_latents", "rule"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no option {', '.join(unknown)}; "
                f"options are {', '.join(sorted(known | set(self.sparsity.option_names())))}"
            )
        if "sparsity" in known:  # a structured config records the rule's name (cfg.json's "sparsity")
            options["sparsity"] = self.sparsity.name
        self.cfg = self.Config(d_in=d_in, n_latents=n_latents, rule=self.sparsity,
                               **{**self.sparsity.sae_defaults, **options})
        self.sparsity.check(self.cfg)
        # Stored (n, d)-major and viewed as (d, n): the sparse backward then reads and writes
        # whole latent columns as contiguous rows (see kernels/__init__.py).
        self.W_enc = nn.Parameter(torch.empty(self.n_total, d_in).t())
        self.b_enc = nn.Parameter(torch.zeros(self.n_total))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.init_decoder()
        self.reset_encoder()
        # Training-time state, saved in checkpoints but not in exported dictionaries.
        self.register_buffer("tokens_since_fired", torch.zeros(self.n_total, dtype=torch.long))
        self.sparsity.init(self)

    @classmethod
    def make_sparsity(cls, sparsity: Sparsity | str | None, options: dict) -> Sparsity:
        """A copy of the rule `sparsity` is, or the rule it names (None: the default) built from its
        options, which are taken out of `options`."""
        if not isinstance(sparsity, Sparsity):
            rule = cls.rule_class(sparsity)
            return rule(**{name: options.pop(name) for name in rule.option_names() if name in options})
        if type(sparsity) not in cls.rules.values():
            raise OptionError("sparsity", f"must be one of {', '.join(cls.rules)}, got {sparsity!r}")
        beside = sorted(set(options) & set(sparsity.option_names()))
        if beside:
            raise ValueError(f"{', '.join(beside)}: set inside sparsity={sparsity!r}, not beside it")
        return replace(sparsity)

    @classmethod
    def rule_class(cls, name: str | None = None) -> type[Sparsity]:
        """The sparsity rule `name` names among this architecture's; None: the default."""
        if name is None:  # a structured config's `sparsity` field, else the one rule
            name = {f.name: f.default for f in fields(cls.Config)}.get("sparsity") or next(iter(cls.rules))
        if name not in cls.rules:
            raise OptionError("sparsity", f"must be one of {', '.join(cls.rules)}, got {name!r}")
        return cls.rules[name]

    @classmethod
    def options(cls, sparsity: str | None = None) -> dict[str, tuple[type, object, str]]:
        """name -> (type, default, help) of every option under the rule `sparsity` (None: the
        default): the SAE's, with the rule's SAE-level defaults, then the rule's (command lines)."""
        rule = cls.rule_class(sparsity)
        defaults = {"sparsity": rule.name, **rule.sae_defaults}
        out = {}
        for config in (cls.Config, rule):
            hints = typing.get_type_hints(config)
            for f in fields(config):
                if f.name not in ("d_in", "n_latents", "rule"):
                    default = f.default if f.default is not MISSING else f.default_factory()
                    out[f.name] = (hints[f.name], defaults.get(f.name, default), f.metadata.get("help", ""))
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            rule = self.__dict__.get("sparsity")
            if rule is not None and name in rule.derived:  # e.g. JumpReLU's threshold
                return getattr(rule, name)(self)
            raise

    # ---- structure -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def n_total(self) -> int:
        """Width of the code vector (n_slots * n_latents for structured SAEs)."""
        return self.cfg.n_total

    @property
    def d_out(self) -> int:
        """Width of x_hat: d_in, except for a transcoder (transcoder.py)."""
        return self.cfg.d_in

    @property
    def input_bias(self) -> Tensor | None:
        """What encoding subtracts from x (rules pass it to the kernels as their b_dec): b_dec, so
        codes see x centred where x_hat is; None for a transcoder, whose b_dec is its output's."""
        return self.b_dec

    def init_decoder(self):
        """Create the decoder parameters. Structured SAEs override this."""
        self.W_dec = nn.Parameter(self._random_rows(self.n_total, self.d_in))

    def decoder_rows(self) -> nn.Parameter:
        """The parameter whose rows are dictionary atoms (normalised, folded, re-initialised)."""
        return self.W_dec

    def _random_rows(self, n: int, d: int) -> Tensor:
        rows = torch.randn(n, d)
        return rows / rows.norm(dim=1, keepdim=True) * self.cfg.decoder_init_norm

    @torch.no_grad()
    def reset_encoder(self):
        if self.cfg.init_encoder_from_decoder:
            self.W_enc.copy_(self.flat_decoder().T)
        else:
            nn.init.kaiming_uniform_(self.W_enc, a=math.sqrt(5))

    def flat_decoder(self) -> Tensor:
        """(n_total, d_in) decoder matrix; structured SAEs materialise it (export only)."""
        return self.W_dec

    def config_dict(self) -> dict:
        """The options as cfg.json and run records store them: flat, the SAE's then the rule's."""
        options = asdict(self.cfg)
        rule = options.pop("rule")
        return {**options, **rule}

    # ---- forward ---------------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_code(self, x: Tensor) -> Code:
        return self.sparsity.encode_code(self, x)

    def encode(self, x: Tensor) -> Tensor:
        """x (B, d_in) -> dense codes (B, n_total), zeros where inactive."""
        self._check_input(x)
        return self.encode_code(x).dense()

    def decode(self, codes: Tensor) -> Tensor:
        """Dense codes (B, n_total) -> x_hat (B, d_in)."""
        if codes.ndim != 2 or codes.shape[1] != self.n_total:
            raise ValueError(f"codes must have shape (batch, {self.n_total}), got {tuple(codes.shape)}")
        return self.decode_code(Code(codes, None, self.n_total))

    def decode_code(self, code: Code) -> Tensor:
        if code.is_sparse:
            return self.decode_sparse(code.values, code.indices) + self.b_dec
        return self.decode_dense(code.values) + self.b_dec

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """sum_j values[b, j] * decoder[indices[b, j]], without b_dec."""
        return kernels.sparse_decode(values, indices, self.W_dec)

    def decode_dense(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec

    def aux_decoder_rows(self, latents: Tensor) -> Tensor:
        """Decoder rows of `latents` for AuxK; gradients reach these rows only."""
        return self.W_dec[latents]

    def decoder_norms(self) -> Tensor:
        """(n_total,) norms of the flat decoder's rows."""
        return self.W_dec.norm(dim=1)

    def forward(self, x: Tensor) -> SAEOutput:
        self._check_input(x)
        code = self.encode_code(x)
        x_hat = self.decode_code(code)
        losses = {"mse": (x_hat - x).pow(2).sum(-1).mean()}
        losses.update(self.extra_losses(x, x_hat, code))
        if self.training:
            self._track_firing(code, x.shape[0])
        return SAEOutput(x_hat, code, losses)

    def extra_losses(self, x: Tensor, x_hat: Tensor, code: Code) -> dict[str, Tensor]:
        """Sparsity penalty ("sparsity") and auxiliary losses: the rule's, and the structure's."""
        return self.sparsity.losses(self, x, x_hat, code)

    def _check_input(self, x: Tensor):
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"input must have shape (batch, {self.d_in}), got {tuple(x.shape)}")

    @torch.no_grad()
    def _track_firing(self, code: Code, n_tokens: int):
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[code.active()] = 0

    def steer_l0_(self, log_error_step: float) -> bool:
        """L0 targeting: move toward the target by `log_error_step` (gain x log(L0 / target)) if
        the sparsity rule has its own lever; False leaves it to the sparsity coefficient."""
        return self.sparsity.steer_l0_(self, log_error_step)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    # ---- training-time weight handling -----------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self):
        if self.cfg.normalize_decoder:
            rows = self.decoder_rows()
            rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self):
        """Project out the gradient component along each (unit-norm) decoder row, in place."""
        rows = self.decoder_rows()
        if self.cfg.normalize_decoder and rows.grad is not None:
            project_out_rows_(rows.grad, rows)

    @torch.no_grad()
    def init_b_dec_(self, x: Tensor, method: str = "geometric_median"):
        """Start b_dec at the data's centre so early latents model deviations, not the mean."""
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(x.float()))
        elif method == "mean":
            self.b_dec.copy_(x.float().mean(0))
        elif method != "zeros":
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {method!r}")

    @torch.no_grad()
    def fold_activation_scale_(self, scale: float):
        """Make a model trained on scale * x work on raw x, with identical codes.

        pre = (s x - b) W + c = (x - b/s)(s W) + c, and x_hat_raw = x_hat / s: so W_enc *= s,
        b_dec /= s, decoder /= s. Thresholds act on pre-activations and stay as they are.
        """
        self.W_enc.mul_(scale)
        self.b_dec.div_(scale)
        self.decoder_rows().div_(scale)

    # ---- export ----------------------------------------------------------------------------
    def save(self, path, **kwargs):
        """Write cfg.json + sae_weights.safetensors (see sae.core.io.save)."""
        return io.save(self, path, **kwargs)

    def export_state(self) -> dict[str, Tensor]:
        """Weights under SAELens keys, for sae_weights.safetensors."""
        return {"W_enc": self.W_enc, "W_dec": self.flat_decoder(), "b_enc": self.b_enc, "b_dec": self.b_dec,
                **self.sparsity.export_state(self)}

    # Structured SAEs name a second file for what a flat W_dec cannot hold (e.g. D and M_s).
    extra_weights_file: ClassVar[str | None] = None

    def export_extra(self) -> dict[str, Tensor]:
        return {}

    @torch.no_grad()
    def load_export_state(self, state: dict[str, Tensor], extra: dict[str, Tensor] | None = None):
        """Inverse of export_state (+ export_extra), used by sae.load."""
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(self, name).copy_(state[name])
        self.load_decoder(state["W_dec"], extra)
        self.sparsity.load_export_state(self, state)

    @torch.no_grad()
    def load_decoder(self, W_dec: Tensor, extra: dict[str, Tensor] | None):
        self.W_dec.copy_(W_dec)

    def saelens_fields(self) -> dict:
        """cfg.json fields SAELens needs to rebuild this SAE; {} when it has no equivalent."""
        return self.sparsity.saelens_fields(self)


def project_out_rows_(grad: Tensor, rows: Tensor, block: int = 256) -> None:
    """grad[i] -= <grad[i], rows[i]> * rows[i] for every row, in place.

    The same roundings as `grad -= (grad * rows).sum(1, keepdim=True) * rows` (a product, a row sum,
    a product, a subtraction; no fused multiply-add), so results are bit-identical to it, but on CPU
    block by block through one cache-sized buffer: one pass over grad and rows instead of four, and
    no n x d temporaries (a fresh one page-faults every step)."""
    n = grad.shape[0]
    if grad.device.type != "cpu" or n <= block:
        grad -= (grad * rows).sum(1, keepdim=True) * rows
        return
    buf = torch.empty(block, grad.shape[1], dtype=torch.promote_types(grad.dtype, rows.dtype))
    dots = torch.empty(block, 1, dtype=buf.dtype)
    for start in range(0, n, block):
        stop = min(n, start + block)
        g, r, b, s = grad[start:stop], rows[start:stop], buf[: stop - start], dots[: stop - start]
        torch.sum(torch.mul(g, r, out=b), 1, keepdim=True, out=s)
        g.sub_(torch.mul(s, r, out=b))


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median
