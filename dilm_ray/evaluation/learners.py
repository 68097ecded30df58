"""Learner architectures the evaluator can train on distilled text, selected by name.

- any name ``build_learner`` accepts (hub id, local folder, ``minilm-l6``, ``smollm2-135m``): the
  pretrained neural learner, fine-tuned by ``train_learner`` under its family's protocol
  (``evaluate.encoder`` / ``evaluate.decoder``, see ``family_config``);
- ``scratch-transformer``: a small BERT-style transformer with random weights drawn from the run
  seed, on the MiniLM tokenizer, trained by ``train_learner`` with its own family protocol;
- ``tfidf-logreg``: word 1-2 gram TF-IDF + logistic regression. Text-level distilled sets can
  train models no embedding-level distillation method can; this learner shows it.

``evaluate_learner`` is the single entry point: same (name, train, validation, seed) gives the
same scores. A ``cache`` dict lets one process build each model once and reset it per run.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from dilm_ray.config import Config, LearnerConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.data.tasks import TaskSpec
from dilm_ray.evaluation.icl import build_icl, demonstrations, icl_predict, is_icl
from dilm_ray.evaluation.train_eval import predict, scores, train_learner
from dilm_ray.families import FAMILIES, SCRATCH, TFIDF, family_of
from dilm_ray.models.learner import Classifier, Learner, build_learner
from dilm_ray.models.registry import load_with_hint
from dilm_ray.precision import autocast, prepare

SCRATCH_TOKENIZER = "minilm-l6"
# Architecture of the from-scratch learner: small enough to train in seconds on CPU.
SCRATCH_SHAPE = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=256, max_position_embeddings=512)


def describe(name: str) -> str:
    """The family of a learner name, for table labels and the rows' ``family`` column (no model
    is loaded): ``families.family_of``'s name, one of ``families.FAMILIES`` ("encoder",
    "decoder", ``SCRATCH``, ``TFIDF``, "hub/local", "icl"). Never raises."""
    return family_of(name).name


def family_config(cfg: Config, name: str) -> Config:
    """The config learner ``name`` is evaluated with: its family's protocol (``evaluate.encoder``,
    ``evaluate.decoder`` or ``evaluate.scratch``: its ``families.Family.section``) in place of ``evaluate.lr``,
    ``steps``, ``warmup_ratio``, ``train_top_layers``, ``body_fraction`` and ``learner.pooling``; ``cfg`` itself when
    the family sets none of them (TF-IDF and ``icl:`` learners have no such protocol)."""
    section = family_of(name).section
    overrides = getattr(cfg.evaluate, section).overrides() if section else {}
    if not overrides:
        return cfg
    pooling = overrides.pop("pooling", None)
    update = {"evaluate": cfg.evaluate.model_copy(update=overrides)}
    if pooling is not None:
        update["learner"] = cfg.learner.model_copy(update={"pooling": pooling})
    return cfg.model_copy(update=update)


# ---------------------------------------------------------------------------------------------
# scratch-transformer


class ScratchLearner(Learner):
    """A randomly initialised body: every ``reset(seed)`` re-draws body and head from ``seed``.

    The draw uses a private ``torch.Generator`` and plain ``torch.nn.init`` calls (BERT's scheme:
    N(0, initializer_range) for linear and embedding weights, zero biases, unit LayerNorm), so it
    neither touches the global RNG nor depends on transformers' "already initialised" flags.
    """

    def reset(self, seed: int) -> None:
        """Head as ``Learner.reset``; every body weight re-drawn from ``seed`` (no pretrained weights)."""
        super().reset(seed)  # the head, drawn from seed as for every learner
        body = self.model.body
        std = float(getattr(body.config, "initializer_range", 0.02))
        rng = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in body.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0.0, std, generator=rng)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, 0.0, std, generator=rng)
                    if module.padding_idx is not None:
                        module.weight[module.padding_idx].zero_()
                elif isinstance(module, nn.LayerNorm):
                    if module.weight is not None:
                        module.weight.fill_(1.0)
                    if module.bias is not None:
                        module.bias.zero_()


def build_scratch(cfg: LearnerConfig, num_labels: int, seed: int) -> ScratchLearner:
    """A small BERT (``SCRATCH_SHAPE``) from config on the MiniLM tokenizer, mean pooling
    unless ``cfg.pooling`` names another rule.

    Float32, reset to ``seed``; ``max_length`` capped at 512 positions. Raises UserError when
    the MiniLM tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = load_with_hint("learner.model", SCRATCH_TOKENIZER, lambda p: AutoTokenizer.from_pretrained(p))
    tokenizer.padding_side = "right"
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **SCRATCH_SHAPE)
    body = BertModel(config, add_pooling_layer=False)
    model = Classifier(body, config.hidden_size, num_labels, "mean" if cfg.pooling == "auto" else cfg.pooling, cfg.dropout)
    max_length = min(cfg.max_length, config.max_position_embeddings)
    learner = ScratchLearner(model, tokenizer, max_length, cfg.embed_batch_size)
    learner.reset(seed)
    return learner


# ---------------------------------------------------------------------------------------------
# tfidf-logreg


def joined_texts(data: TextSet) -> list[str]:
    """One string per row: a pair's two texts joined as the TF-IDF family encodes pairs
    (``a [SEP] b``), a single text unchanged."""
    return [FAMILIES[TFIDF].pair.join(t) for t in data.texts]


def tfidf_predict(train: TextSet, validation: TextSet, seed: int) -> np.ndarray:
    """Fit TF-IDF (word 1-2 grams, sublinear tf) + logistic regression on ``train``, predict ``validation``.

    Degenerate training sets (one label only, or no token TfidfVectorizer can keep) predict the
    most frequent training label instead of raising.

    Returns int64 [len(validation)] labels. An empty ``train`` raises ValueError (no majority).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    majority = int(np.bincount(train.labels).argmax())
    if len(np.unique(train.labels)) < 2:
        return np.full(len(validation), majority, dtype=np.int64)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    try:
        x_train = vectorizer.fit_transform(joined_texts(train))
    except ValueError:  # empty vocabulary
        return np.full(len(validation), majority, dtype=np.int64)
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    clf.fit(x_train, train.labels)
    return clf.predict(vectorizer.transform(joined_texts(validation))).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# entry point


def build(name: str, cfg: Config, task: TaskSpec, seed: int) -> Learner | None:
    """The model behind ``name`` (None for tfidf-logreg, which is fitted from scratch per call).

    Reset to ``seed``, with a head for ``task.num_labels``. Raises UserError when the model
    cannot be loaded.
    """
    if name == TFIDF:
        return None
    if name == SCRATCH:
        return build_scratch(cfg.learner, task.num_labels, seed)
    return build_learner(cfg.learner, task.num_labels, seed, name, cfg.evaluate.body_fraction)


def _cached(name: str, cfg: Config, task: TaskSpec, seed: int, cache: dict | None) -> Learner | None:
    if cache is None:
        return build(name, cfg, task, seed)
    learner = cache.get(name)
    # A different label count needs a different head, another pooling rule another learner: rebuild.
    pooling, fraction = cfg.learner.pooling, cfg.evaluate.body_fraction
    if (
        learner is None
        or learner.model.head.out_features != task.num_labels
        or pooling not in ("auto", learner.model.pooling)
        or learner.body_fraction != fraction
    ):
        learner = cache[name] = build(name, cfg, task, seed)
    return learner


def evaluate_learner(
    name: str, train: TextSet, validation: TextSet, cfg: Config, task: TaskSpec, seed: int, cache: dict | None = None
) -> dict[str, float]:
    """Train learner ``name`` on ``train`` with ``seed`` and score it on ``validation``.

    Returns ``scores(...)`` (accuracy, score, and f1 for accuracy_f1 tasks) plus "seconds", the
    time to train and predict (model loading excluded). Neural
    learners follow ``cfg.evaluate`` (``train_learner`` resets them to ``seed`` first), so a
    learner taken from ``cache`` gives the same scores as a freshly built one.

    Scores are fractions in [0, 1]; seconds are wall-clock. DiLM Sec. 4 (train a learner on the
    distilled set, score it on validation), with the learner family's protocol
    (``family_config``). Raises UserError when the model cannot be loaded.
    """
    cfg = family_config(cfg, name)
    if name == TFIDF:
        start = time.perf_counter()
        preds = tfidf_predict(train, validation, seed)
    elif is_icl(name):
        model, tokenizer = cache[name] if cache is not None and name in cache else build_icl(name, cfg.precision)
        if cache is not None:
            cache[name] = (model, tokenizer)
        start = time.perf_counter()
        demos = demonstrations(train, cfg.evaluate.icl_shots_per_class, seed)
        with autocast(cfg.precision, next(model.parameters()).device):
            preds = icl_predict(model, tokenizer, task, demos, validation, cfg.evaluate.icl_batch_size)
    else:
        learner = _cached(name, cfg, task, seed, cache)
        prepare(learner.model.body, cfg.precision, learner.device)
        start = time.perf_counter()
        train_learner(learner, train, cfg.evaluate, seed, cfg.precision)
        preds = predict(learner, validation, cfg.evaluate.eval_batch_size, cfg.precision)
    out = scores(preds, validation.labels, task.metric)
    out["seconds"] = time.perf_counter() - start
    return out
