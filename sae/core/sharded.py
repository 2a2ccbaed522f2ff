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
from sae.core.architectures.binding import BindingSAE
from sae.core.architectures.sparsity import Sparsity
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
        values, indices, keep, selected = select_batch_topk(x, sae, SumGrads.apply(sae.b_dec, group), self.k,
                                                            x.shape[0], group)
        self._update_threshold(sae, selected)
        return shard_code(values * keep.to(values.dtype), indices, sae.n_total, group)


def select_batch_topk(x: Tensor, sae: SAE, b_dec: Tensor, k: int, n_rows: int, group):
    """BatchTopK's selection when the candidates are spread over ranks (rows in data parallel,
    latents in a sharded dictionary): each rank's top-`cap` per row, then the n_rows*k largest
    of every rank's, found by one all-gather (cap doubles while a row may have lost selected
    latents past it). Returns (values, indices, keep mask, the selected values of all ranks)."""
    n = sae.n_total
    cap = min(n, 4 * k)
    while True:
        values, indices = kernels.topk_encode(x, sae.W_enc, sae.b_enc, cap, b_dec=b_dec)
        every = group.all_gather(values.detach().reshape(-1))
        cut = every.topk(min(n_rows * k, every.numel()), sorted=False).values.min()
        keep = values.detach() >= cut
        row_min, at = values.detach().min(dim=1, keepdim=True)
        short = torch.tensor([int(cap < n and bool((keep.gather(1, at) & (row_min > 0)).any()))], device=x.device)
        if not group.all_reduce(short, dist.ReduceOp.MAX).item():
            return values, indices, keep, every[every >= cut]
        cap = min(n, 2 * cap)


SHARDED_RULES = {TopK: ShardedTopK, BatchTopK: ShardedBatchTopK}


class Shard:
    """What a shard adds to its architecture: which of the whole dictionary's latents it holds
    (`columns`: every slot's block of them, for a binding SAE), a decode that sums the shards'
    partial decodes, and cutting / gathering tensors between the shard and the whole."""

    rows_name = "W_dec"  # the parameter whose rows are this shard's atoms

    def setup_shard(self, full: SAE, group):
        self.architecture = full.architecture  # run records name what the shards make up
        n_local = self.n_latents
        self.group, self.lo, self.hi = group, group.rank * n_local, (group.rank + 1) * n_local
        blocks = full.n_total // full.n_latents  # slots (1 for a flat dictionary)
        self.columns = torch.cat([b * full.n_latents + torch.arange(self.lo, self.hi) for b in range(blocks)])
        self.take_from(full)

    def cut(self, name: str):
        """(dimension, whole-dictionary ids) of this shard's part of tensor `name`; None: whole."""
        if name in ("W_enc", "b_enc", "tokens_since_fired"):
            return (1 if name == "W_enc" else 0), self.columns
        if name == self.rows_name:
            return 0, torch.arange(self.lo, self.hi)
        return None

    def slice_tensor(self, name: str, t: Tensor) -> Tensor:
        cut = self.cut(name)
        if cut is None or not torch.is_tensor(t) or t.dim() == 0:
            return t
        return t.index_select(cut[0], cut[1].to(t.device))

    def gather_tensor(self, name: str, t: Tensor) -> Tensor:
        """The whole tensor from every shard's part (every rank gets it)."""
        cut = self.cut(name)
        if cut is None or not torch.is_tensor(t) or t.dim() == 0:
            return t
        dim, ids = cut
        parts = self.group.all_gather(t.movedim(dim, 0).contiguous())
        where = self.group.all_gather(ids.to(t.device))
        out = torch.empty_like(parts)
        out[where] = parts
        return out.movedim(0, dim)

    @torch.no_grad()
    def take_from(self, full: SAE):
        """This shard's part of `full`'s weights and buffers."""
        whole = full.state_dict()
        for name, t in self.state_dict().items():
            t.copy_(self.slice_tensor(name, whole[name]))

    @torch.no_grad()
    def gather_into(self, full: SAE):
        """Every shard's weights and buffers into `full` (every rank ends with the whole dictionary)."""
        whole = full.state_dict()
        for name, t in self.state_dict().items():
            whole[name].copy_(self.gather_tensor(name, t))

    def decode_code(self, code: Code) -> Tensor:
        part = self.decode_sparse(code.values, code.indices) if code.is_sparse else self.decode_dense(code.values)
        return AllReduceSum.apply(part, self.group) + self.b_dec


def shard_options(full: SAE, group) -> tuple[Sparsity, dict]:
    """The sharded rule and the SAE options of `full`'s shard; refuses what cannot be sharded."""
    rule = SHARDED_RULES.get(type(full.sparsity))
    if rule is None:
        raise OptionError("parallel", f"latents shards topk and batchtopk rules, not {full.sparsity.name}")
    if full.n_latents % group.world:
        raise OptionError("n_latents", f"must be a multiple of the {group.world} ranks to shard it, got {full.n_latents}")
    if full.cfg.k > full.n_latents // group.world:
        raise OptionError("k", f"must be <= n_latents / ranks = {full.n_latents // group.world} to shard it, "
                          f"got {full.cfg.k}")
    if getattr(full.cfg, "slot_group_sizes", None):
        raise OptionError("parallel", "latents cannot shard slot_group_sizes (prefixes of the whole dictionary)")
    options = {f.name: getattr(full.cfg, f.name) for f in fields(full.cfg)
               if f.name not in ("d_in", "n_latents", "rule", "sparsity")}
    return rule(**{f.name: getattr(full.sparsity, f.name) for f in fields(full.sparsity)}), options


class ShardedSAE(Shard, SAE):
    """This rank's n/R latents of a flat TopK or BatchTopK dictionary `full` (not registered as
    an architecture: it exists only inside a job; gather_into puts the result back into `full`)."""

    rules = {"topk": ShardedTopK, "batchtopk": ShardedBatchTopK}

    def __init__(self, full: SAE, group):
        rule, options = shard_options(full, group)
        super().__init__(full.d_in, full.n_latents // group.world, sparsity=rule, **options)
        self.setup_shard(full, group)


class ShardedBindingSAE(Shard, BindingSAE):
    """This rank's n/R atoms of a binding SAE's D, with their encoder columns in every slot; the
    slot transforms M_s are whole on every rank. Each rank's partial decode sum_s (z_s D_r) M_s^T
    uses M, so M's gradient is summed over ranks."""

    rules = {"topk": ShardedTopK, "batchtopk": ShardedBatchTopK}
    rows_name = "dictionary"

    def __init__(self, full: SAE, group):
        rule, options = shard_options(full, group)
        super().__init__(full.d_in, full.n_latents // group.world, sparsity=rule, **options)
        self.setup_shard(full, group)

    def free_transforms(self) -> Tensor:
        if self.cfg.slot_transform == "identity" or "group" not in self.__dict__:  # (construction: not yet a shard)
            return super().free_transforms()
        param = SumGrads.apply(self.transform_param, self.group)
        if self.cfg.slot_transform == "full":
            return param
        skew = param - param.transpose(1, 2)
        return self.transform_base @ torch.linalg.matrix_exp(skew.float()).to(param.dtype)


def shard(full: SAE, group) -> SAE:
    """This rank's shard of `full` (a flat TopK/BatchTopK dictionary or a binding SAE)."""
    if isinstance(full, BindingSAE):
        return ShardedBindingSAE(full, group)
    if full.flat_decoder() is not full.W_dec:
        raise OptionError("parallel", f"latents shards flat and binding dictionaries, not {full.architecture}")
    return ShardedSAE(full, group)
