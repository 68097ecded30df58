"""The learner's embeddings of the train rows, cached: stage 2's teacher sets and the coresets use the same ones."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dilm_ray.data.dataset import TextSet
from dilm_ray.keys import content_key
from dilm_ray.models.learner import Learner
from dilm_ray.precision import autocast, key_parts, prepare


def train_embeddings(cache_dir: Path, train: TextSet, learner: Learner, precision: str = "fp32") -> torch.Tensor:
    """``learner.embed(train)``: float32 [n_rows, hidden], cached in ``cache_dir``.

    The key is the learner's ``signature()`` (model weights, tokenizer, encoding, pooling,
    dtype), the ``precision`` the forward passes run in (``dilm_ray.precision``) and the digest
    of the rows themselves, so any change of these misses the cache.
    The body is pretrained and embedding runs in eval mode, so the learner's seed does not
    change the result and is not part of the key.

    Rows in ``train``'s order, on CPU. Used for stage 2's representative teachers (DiLM Sec. 3.2)
    and the K-centers / herding coresets (Sec. 4).
    """
    key = content_key(learner.signature(), train.digest(), *key_parts(precision))
    path = cache_dir / f"train-embeddings-{key}.pt"
    if path.is_file():
        return torch.load(path)
    prepare(learner.model.body, precision, learner.device)
    with autocast(precision, learner.device):
        embeddings = learner.embed(train, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers may race: the last rename wins, all equal
    torch.save(embeddings, tmp)
    tmp.replace(path)
    return embeddings
