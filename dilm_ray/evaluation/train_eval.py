"""Train a fresh learner on a (distilled) set and score it on the validation split (DiLM Sec. 4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dilm_ray.config import EvaluateConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.models.learner import Learner
from dilm_ray.models.blocks import train_top_blocks
from dilm_ray.precision import autocast, hold_frozen
from dilm_ray.train.optim import adamw, schedule


def train_learner(learner: Learner, train: TextSet, cfg: EvaluateConfig, seed: int, precision: str = "fp32") -> None:
    """Paper protocol: AdamW, warmup then cosine, ``cfg.steps`` steps of min(batch_size, |D|).

    The decay is ``cfg.scheduler`` (cosine by default); the head and, with
    ``cfg.train_top_layers``, only the top blocks of the body train (0: the head alone, a
    linear probe on the body's eval-mode features, computed once). Resets the learner to ``seed`` and seeds
    the global torch RNG (dropout); batches walk through reshuffled passes over ``train``; the
    cross-entropy gradient is clipped to ``cfg.grad_clip``. Forward passes run under
    ``precision`` (bf16 autocast; fp32 cross-entropy, master weights and AdamW state). Trains in
    place, returns None. DiLM Sec. 4.
    """
    learner.reset(seed)
    torch.manual_seed(seed)  # dropout masks
    rng = np.random.default_rng(seed)
    model = learner.model
    train_top_blocks(model.body, cfg.train_top_layers)
    hold_frozen(model.body, precision)  # frozen blocks run in bf16 under bf16, as in the stages
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    scheduler = schedule(optimizer, cfg.scheduler, cfg.steps, cfg.warmup_ratio)
    size = min(cfg.batch_size, len(train))
    order = np.empty(0, dtype=np.int64)
    probe = not any(p.requires_grad for p in model.body.parameters())
    if probe:  # a linear probe: the frozen body's features once (eval mode), not once per step
        with autocast(precision, learner.device):
            features = learner.embed(train).to(learner.device)
    labels = torch.tensor(train.labels, device=learner.device)  # a copy: set labels are read-only arrays
    model.train()
    for _ in range(cfg.steps):
        if len(order) < size:
            order = np.concatenate([order, rng.permutation(len(train))])
        idx, order = order[:size], order[size:]
        rows = torch.as_tensor(idx, device=learner.device)
        if probe:
            logits = model.head(model.dropout(features[rows]))
        else:
            with autocast(precision, learner.device):
                logits = model(**learner.batch(train.select(idx))).float()
        loss = F.cross_entropy(logits, labels[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def predict(learner: Learner, data: TextSet, batch_size: int, precision: str = "fp32") -> np.ndarray:
    """Predicted labels; batches hold texts of similar length so little compute goes to padding.

    Int64 [len(data)] in ``data``'s order (argmax of the logits, forward passes under
    ``precision``). Leaves the model in eval mode.
    """
    model = learner.model
    model.eval()
    order = np.argsort([sum(len(t) for t in texts) for texts in data.texts], kind="stable")
    preds = np.empty(len(data), dtype=np.int64)
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        with autocast(precision, learner.device):
            preds[idx] = model(**learner.batch(data.select(idx))).float().argmax(-1).cpu().numpy()
    return preds


def scores(preds: np.ndarray, labels: np.ndarray, metric: str) -> dict[str, float]:
    """accuracy; for ``accuracy_f1`` (QQP) also F1 of label 1 and their mean as the score.

    ``preds`` / ``labels``: int [n]. Every value is a fraction in [0, 1]; keys ``accuracy``,
    ``score`` (and ``f1``). F1 is 0 when neither side has a label-1 row.
    """
    accuracy = float((preds == labels).mean())
    out = {"accuracy": accuracy, "score": accuracy}
    if metric == "accuracy_f1":
        tp = float(((preds == 1) & (labels == 1)).sum())
        f1 = 2 * tp / max(1.0, float((preds == 1).sum() + (labels == 1).sum()))
        out.update(f1=f1, score=(accuracy + f1) / 2)
    return out
