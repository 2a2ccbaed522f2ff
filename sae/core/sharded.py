"""Latent-sharded dictionaries (tensor parallel): each of R ranks holds n/R latents.

Rank r holds latents [r*n/R, (r+1)*n/R): its encoder columns, decoder rows, biases and (being the
parameters its optimiser sees) their Adam state; b_dec is replicated. Every rank sees the whole
batch. A step:
    TopK       local top-k of the shard's pre-activations, all-gather of those (B, k) candidates,
               global top-k over the R*k: a latent is kept where it is among the winners. The
               global top-k of n values is the top-k of the union of every shard's top-k, so this
               is exact (ties aside).
    BatchTopK  each shard's per-row top-cap candidates, all-gathered; the batch's B*k largest kept
               (cap doubles, on every rank, while a row may have lost selected latents past it).
    AuxK       the same selection over the dead latents of every shard (top-k_aux of the union).
    decode     each rank decodes its kept latents (a partial sum) and one all-reduce adds them.
Gradients: the loss is computed identically on every rank, so d loss / d x_hat is the same
everywhere and each rank's backward reaches its own shard; the encoder's use of b_dec (x - b_dec)
is partial per shard, so its gradient is summed across ranks (SumGrads).
"""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.distributed as dist
from torch import Tensor

from sae.core import kernels
from sae.core.architectures.base import SAE, Code
from sae.core.architectures.batchtopk import BatchTopK
from sae.core.architectures.topk import TopK
from sae.core.config import OptionError


class AllReduceSum(torch.autograd.Function):
    """Forward: the sum of every rank's partial x_hat. Backward: the gradient as it is (each
    rank's loss is the same function of the summed x_hat)."""

    @staticmethod
    def forward(ctx, part: Tensor, group) -> Tensor:
        return group.all_reduce(part.clone())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class SumGrads(torch.autograd.Function):
    """Forward: identity. Backward: the gradient summed over ranks (a replicated tensor that
    every shard's encoder reads: b_dec)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.group.all_reduce(grad.contiguous().clone()), None


def winners(values: Tensor, k: int, group) -> Tensor:
    """(B, c) bool: which of this rank's candidates `values` (B, c) are among each row's k
    largest over every rank's candidates (every rank decides the same from the same gather)."""
    B, c = values.shape
    every = group.all_gather(values.unsqueeze(0).contiguous())  # (R, B, c)
    every = every.permute(1, 0, 2).reshape(B, group.world * c)
    top = every.topk(min(k, every.shape[1]), dim=1, sorted=False).indices
    chosen = torch.zeros_like(every, dtype=torch.bool).scatter_(1, top, True)
    return chosen.view(B, group.world, c)[:, group.rank]


class ShardCode(Code):
    """Codes of one shard; l0() counts over every shard (the logs read it)."""

    group = None

    def l0(self) -> Tensor:
        return self.group.all_reduce(super().l0().reshape(1).double()).float()[0]


def shard_code(values, indices, n, group) -> ShardCode:
    code = ShardCode(values, indices, n)
    code.group = group
    return code


class ShardedTopK(TopK):
    def encode_code(self, sae: SAE, x: Tensor) -> Code:
        values, indices = kernels.topk_encode(x, sae.W_enc, sae.b_enc, self.k, b_dec=SumGrads.apply(sae.b_dec, sae.group))
        keep = winners(values.detach(), self.k, sae.group)
        return shard_code(values * keep.to(values.dtype), indices, sae.n_total, sae.group)

    def losses(self, sae: SAE, x: Tensor, x_hat: Tensor, code: Code) -> dict[str, Tensor]:
        if not sae.training or self.aux_coeff == 0:
            return {}
        dead = sae.dead_mask().nonzero().squeeze(1)
        n_dead = int(sae.group.all_reduce(torch.tensor([dead.numel()], device=x.device)).item())
        if n_dead == 0:
            return {}
        return {"aux": self.aux_coeff * sharded_aux_loss(self, sae, x, x_hat, dead, n_dead)}


def sharded_aux_loss(rule: TopK, sae: SAE, x: Tensor, x_hat: Tensor, dead: Tensor, n_dead: int) -> Tensor:
    """AuxK over every shard's dead latents: the top-k_aux of their union reconstructs the residual
    (kernels.auxk_reconstruct's selection, made global as in ShardedTopK)."""
    aux_k = rule.k_aux(sae)
    k_eff = min(aux_k, n_dead)
    c = min(k_eff, dead.numel())
    # Padding (-1, below every relu'd value) keeps the gathered shapes equal on every rank.
    candidates = x.new_full((x.shape[0], k_eff), -1.0)
    # Every rank's backward must meet the same collectives: a shard with no dead latent still
    # passes b_dec through SumGrads (with a zero gradient).
    b_dec = SumGrads.apply(sae.b_dec, sae.group)
    part = x.new_zeros(x.shape) + 0 * b_dec
    if c:
        values, indices = kernels.topk_encode(x, sae.W_enc[:, dead], sae.b_enc[dead], c, b_dec=b_dec)
        candidates[:, :c] = values.detach()
    keep = winners(candidates, k_eff, sae.group)
    if c:
        part = part + kernels.sparse_decode(values * keep[:, :c].to(values.dtype), indices, sae.aux_decoder_rows(dead))
    residual_hat = AllReduceSum.apply(part, sae.group)
    residual = (x - x_hat).detach()
    return (residual_hat - residual).pow(2).sum(-1).mean() * min(n_dead / aux_k, 1.0)


class ShardedBatchTopK(BatchTopK):
    losses = ShardedTopK.losses  # AuxK over every shard's dead latents, as for TopK

    def encode_code(self, sae: SAE, x: Tensor) -> Code:
        group = sae.group
        if not sae.training:  # inference: the tracked threshold, latent by latent
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            return shard_code(pre.relu() * (pre > sae.threshold), None, sae.n_total, group)
        n, B = sae.n_total, x.shape[0]
        cap = min(n, 4 * self.k)
        while True:
            values, indices = kernels.topk_encode(x, sae.W_enc, sae.b_enc, cap, b_dec=SumGrads.apply(sae.b_dec, group))
            every = group.all_gather(values.detach().reshape(-1))
            cut = every.topk(min(B * self.k, every.numel()), sorted=False).values.min()
            keep = values.detach() >= cut
            row_min, at = values.detach().min(dim=1, keepdim=True)
            short = torch.tensor([int(cap < n and bool((keep.gather(1, at) & (row_min > 0)).any()))], device=x.device)
            if not group.all_reduce(short, dist.ReduceOp.MAX).item():
                break
            cap = min(n, 2 * cap)
        self._update_threshold(sae, every[every >= cut])
        return shard_code(values * keep.to(values.dtype), indices, n, group)


SHARDED_RULES = {TopK: ShardedTopK, BatchTopK: ShardedBatchTopK}


class ShardedSAE(SAE):
    """This rank's n/R latents of a flat TopK or BatchTopK dictionary `full` (not registered as
    an architecture: it exists only inside a job; gather_into puts the result back into `full`)."""

    rules = {"topk": ShardedTopK, "batchtopk": ShardedBatchTopK}

    def __init__(self, full: SAE, group):
        rule = SHARDED_RULES.get(type(full.sparsity))
        if rule is None or full.flat_decoder() is not full.W_dec:
            raise OptionError("parallel", f"latents shards flat topk and batchtopk dictionaries, not {full.architecture}")
        if full.n_latents % group.world:
            raise OptionError("n_latents", f"must be a multiple of the {group.world} ranks to shard it, got {full.n_latents}")
        n_local = full.n_latents // group.world
        if full.cfg.k > n_local:
            raise OptionError("k", f"must be <= n_latents / ranks = {n_local} to shard it, got {full.cfg.k}")
        options = {f.name: getattr(full.cfg, f.name) for f in fields(full.cfg) if f.name not in ("d_in", "n_latents", "rule")}
        rule_options = {f.name: getattr(full.sparsity, f.name) for f in fields(full.sparsity)}
        super().__init__(full.d_in, n_local, sparsity=rule(**rule_options), **options)
        self.architecture = full.architecture  # run records name what the shards make up
        self.group, self.lo, self.hi = group, group.rank * n_local, (group.rank + 1) * n_local
        with torch.no_grad():
            self.W_enc.copy_(full.W_enc[:, self.lo:self.hi])
            self.b_enc.copy_(full.b_enc[self.lo:self.hi])
            self.W_dec.copy_(full.W_dec[self.lo:self.hi])
            self.b_dec.copy_(full.b_dec)
            self.tokens_since_fired.copy_(full.tokens_since_fired[self.lo:self.hi])
            if hasattr(full, "threshold"):
                self.threshold.copy_(full.threshold)

    def decode_code(self, code: Code) -> Tensor:
        part = self.decode_sparse(code.values, code.indices) if code.is_sparse else self.decode_dense(code.values)
        return AllReduceSum.apply(part, self.group) + self.b_dec

    @torch.no_grad()
    def gather_into(self, full: SAE):
        """Every shard's weights and buffers into `full` (every rank ends with the whole dictionary)."""
        g = self.group
        full.W_enc.copy_(g.all_gather(self.W_enc.t().contiguous()).t())
        full.b_enc.copy_(g.all_gather(self.b_enc.detach()))
        full.W_dec.copy_(g.all_gather(self.W_dec.detach()))
        full.b_dec.copy_(self.b_dec)
        full.tokens_since_fired.copy_(g.all_gather(self.tokens_since_fired))
        if hasattr(full, "threshold"):
            full.threshold.copy_(self.threshold)
