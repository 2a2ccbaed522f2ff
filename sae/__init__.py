"""Sparse autoencoders trained on cached residual activations: standard and matrix-binding.

    import sae
    m = sae.TopKSAE(d_in=64, n_latents=1024, k=8)
    m = sae.BindingSAE(d_in=64, n_latents=256, n_slots=2, k=8)   # decoder [D; M_2 D]
    out = m(x)                      # out.x_hat, out.codes, out.loss, out.losses
    sae.train(m, data, steps=1000, batch_size=1024, lr=1e-3, seed=0)
    m.save("dir"); m2 = sae.load("dir")
"""
from .base import SAE, Code, SAEConfig, SAEOutput
from .batchtopk import BatchTopKSAE
from .binding import BindingSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .relu import ReLUSAE
from .io import load, save
from .topk import TopKSAE
from .trainer import TrainConfig, TrainResult, train

__all__ = ["SAE", "SAEConfig", "SAEOutput", "Code", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "BindingSAE", "MatryoshkaSAE", "load", "save",
           "train", "TrainConfig", "TrainResult"]
