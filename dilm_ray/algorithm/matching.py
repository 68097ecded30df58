"""Gradient matching: the pure tensor math of DiLM stage 2."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_weights(gen_losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(-loss / T): likelier generated samples weigh more; differentiable w.r.t. the losses."""
    return F.softmax(-gen_losses / temperature, dim=-1)


def per_sample_head_grads(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Cross-entropy gradient of a linear head for each sample, flattened as [W, b]: shape [n, C*H + C].

    For logits = f W^T + b: dL_i/dW = (p_i - y_i) f_i^T and dL_i/db = p_i - y_i.
    """
    probs = (features @ weight.T + bias).softmax(-1)
    residual = probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)
    grad_w = residual.unsqueeze(-1) * features.unsqueeze(1)  # [n, C, H]
    return torch.cat([grad_w.flatten(1), residual], dim=1)


def weighted_grad(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of sum_i w_i L_i (mean when ``weights`` is None); linear, so it carries w's graph."""
    if weights is None:
        return per_sample.mean(0)
    return weights @ per_sample


def match_loss(grad_real: torch.Tensor, grad_syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over labels of (1 - cos(g_real, g_syn)) / num_labels, from [num_labels, P] gradients.

    Returns (loss, per-label cosine similarities).
    """
    sims = F.cosine_similarity(grad_real, grad_syn, dim=-1)
    return (1.0 - sims).sum() / grad_real.shape[0], sims
