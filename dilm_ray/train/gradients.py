"""Per-sample learner gradients, flattened: the inputs of gradient matching.

``head``: from pooled features taken under no_grad (cheap, exact for the head parameters).
``full``: all learner parameters, one backward per sample (expensive; for small batches).
Both run the learner in eval mode so that dropout does not make the target noisy.
The outputs are detached: generator gradients flow only through the sample weights (DiLM Sec. 3.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilm_ray.algorithm.matching import per_sample_head_grads
from dilm_ray.data.dataset import TextSet
from dilm_ray.models.learner import Learner


def head_grads(learner: Learner, data: TextSet) -> torch.Tensor:
    """Per-sample head gradients: float32 [n, C*H + C] on the learner's device, no graph (also
    under bf16 autocast: the features are cast up first).

    See ``per_sample_head_grads``; restores the learner's train/eval mode.
    """
    model = learner.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = model.features(**learner.batch(data)).float()  # bf16 under autocast: the head gradients stay fp32
        labels = torch.as_tensor(data.labels, device=features.device)
        with torch.autocast(features.device.type, enabled=False):  # the caller may be under bf16 autocast
            grads = per_sample_head_grads(features, labels, model.head.weight, model.head.bias)
    model.train(was_training)
    return grads


def full_grads(learner: Learner, data: TextSet) -> torch.Tensor:
    """Per-sample gradients of all trainable learner parameters: float32 [n, P], detached.

    P = number of trainable elements (unused parameters give zeros); n backward passes and
    n * P floats of memory. Restores the learner's train/eval mode.
    """
    model = learner.model
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = learner.batch(data)
    labels = torch.as_tensor(data.labels, device=learner.device)
    rows = []
    for i in range(len(data)):
        logits = model(**{k: v[i : i + 1] for k, v in batch.items()})
        grads = torch.autograd.grad(F.cross_entropy(logits.float(), labels[i : i + 1]), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    model.train(was_training)
    return torch.stack(rows).detach()


def learner_grads(learner: Learner, data: TextSet, kind: str) -> torch.Tensor:
    """``head_grads`` when ``kind == "head"``, else ``full_grads`` (``DistillConfig.grad``): [n, P]."""
    return head_grads(learner, data) if kind == "head" else full_grads(learner, data)
