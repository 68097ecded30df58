"""Gradient matching: the pure tensor math of DiLM stage 2 (DiLM Sec. 3.2).

Pure functions of tensors (no models, no I/O); ``train.distill`` composes them per label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_weights(gen_losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(-loss / T): likelier generated samples weigh more; differentiable w.r.t. the losses.

    ``gen_losses``: float [m], the generator's per-sample mean token NLL (nats/token) of one
    label's generated batch; ``temperature``: T > 0. Returns float [m], non-negative, summing
    to 1 along the last dim. The loss weighting that makes the matching loss differentiable
    w.r.t. the generator (DiLM Sec. 3.2).
    """
    return F.softmax(-gen_losses / temperature, dim=-1)


def per_sample_head_grads(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Cross-entropy gradient of a linear head for each sample, flattened as [W, b]: shape [n, C*H + C].

    For logits = f W^T + b: dL_i/dW = (p_i - y_i) f_i^T and dL_i/db = p_i - y_i.

    ``features``: float [n, H]; ``labels``: int64 [n] in [0, C); ``weight``: [C, H]; ``bias``: [C].
    Returns the dtype of the logits (float32 for the float32 learner), W row-major then b, the
    order of ``nn.Linear``'s parameters. ``F.one_hot`` raises RuntimeError for a label >= C.
    The classifier-head gradient matched in DiLM Sec. 3.2.
    """
    probs = (features @ weight.T + bias).softmax(-1)
    residual = probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)
    grad_w = residual.unsqueeze(-1) * features.unsqueeze(1)  # [n, C, H]
    return torch.cat([grad_w.flatten(1), residual], dim=1)


def weighted_grad(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of sum_i w_i L_i (mean when ``weights`` is None); linear, so it carries w's graph.

    ``per_sample``: float [n, P]; ``weights``: float [n] on the same device (e.g. ``sample_weights``)
    or None. Returns float [P]. Real batches use the mean, generated ones the LM-loss weights
    (DiLM Sec. 3.2).
    """
    if weights is None:
        return per_sample.mean(0)
    return weights @ per_sample


def match_loss(grad_real: torch.Tensor, grad_syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over labels of (1 - cos(g_real, g_syn)) / num_labels, from [num_labels, P] gradients.

    Returns (loss, per-label cosine similarities): a 0-dim tensor in [0, 2] (dimensionless) and
    float [num_labels] in [-1, 1]; the loss keeps ``grad_syn``'s graph. The gradient matching
    loss of DiLM Sec. 3.2.
    """
    sims = F.cosine_similarity(grad_real, grad_syn, dim=-1)
    return (1.0 - sims).sum() / grad_real.shape[0], sims
