"""The learner: a pretrained text encoder (or decoder) body, a pooling rule and a linear head.

Splitting ``features`` from ``head`` lets gradient matching take head gradients from features
computed under ``no_grad``: the same gradient as through the whole model, at ~1/1000 the cost.

The learner is the model whose gradients DiLM matches (Sec. 3.2) and the one trained on the
distilled sets in evaluation (Sec. 4).
"""

from __future__ import annotations

import copy
import functools
import inspect

import numpy as np
import torch
from torch import nn

from dilm_ray.config import LearnerConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.families import FAMILIES, PairEncoding, is_decoder
from dilm_ray.models.blocks import transformer_blocks
from dilm_ray.models.registry import load_with_hint


class Classifier(nn.Module):
    """``body`` (a transformers base model), ``pool`` by ``pooling``, dropout, then a linear head
    [num_labels, hidden]."""

    def __init__(self, body: nn.Module, hidden: int, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.body = body
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled body output, before dropout: float [B, hidden] (the body's dtype) from int64 [B, T]
        inputs; ``token_type_ids`` (segment ids, 0 for the first text of a pair, 1 for the second)
        go to bodies that have them."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: float [B, num_labels] from int64 [B, T] ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``)."""
        return self.head(self.dropout(self.features(input_ids, attention_mask, token_type_ids)))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per row, [B, H] from ``hidden`` [B, T, H] and ``mask`` 0/1 [B, T].

    ``cls``: the first position; ``last``: the last real token (assumes right padding); any other
    value (``mean``): the mean over real tokens.
    """
    if how == "cls":
        return hidden[:, 0]
    if how == "last":  # right padding: the last real token of each row
        last = mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class Learner:
    """A classifier plus its tokenizer, resettable to the pretrained body and a fresh seeded head.

    ``max_length``: the truncation length in tokens; ``embed_batch_size``: rows per ``embed`` batch;
    ``body_fraction``: the share of the pretrained body's blocks kept, first ones first (None: all).
    """

    def __init__(self, model: Classifier, tokenizer, max_length: int, embed_batch_size: int, body_fraction: float | None = None):
        self.model = model
        self.body_fraction = body_fraction
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.embed_batch_size = embed_batch_size
        self._initial_body = copy.deepcopy(model.body.state_dict())

    @property
    def device(self) -> torch.device:
        """The device of the classifier's (first) parameter."""
        return next(self.model.parameters()).device

    def signature(self) -> dict:
        """Everything that decides the features this learner computes for a text: its class,
        tokenizer, how it encodes a row (pairs go to the tokenizer as a text pair), truncation,
        pooling, parameter dtype and a SHA-1 of its initial body weights. Cache keys of
        embeddings include it, so a change of any of these misses the cache.

        A JSON-serialisable dict; hashing the body costs one pass over its weights."""
        import hashlib

        weights = hashlib.sha1()
        for name, tensor in sorted(self._initial_body.items()):
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return {
            "class": type(self).__name__,
            "tokenizer": [type(self.tokenizer).__name__, len(self.tokenizer), self.tokenizer.padding_side],
            "encoding": PAIR_ENCODING_VERSION,
            "pair_encoding": self.pair_encoding,
            "max_length": self.max_length,
            "pooling": self.model.pooling,
            "dtype": str(next(self.model.parameters()).dtype),
            "weights": weights.hexdigest(),
        }

    def reset(self, seed: int) -> None:
        """Pretrained body, new head drawn from ``seed`` (the paper re-initialises every outer loop).

        Head weight ~ U(-1/sqrt(H), 1/sqrt(H)) from a private CPU generator, bias zero; the global
        RNG is untouched. Re-initialisation per outer loop: DiLM Alg. 1 (Sec. 3.2).
        """
        self.model.body.load_state_dict(self._initial_body)
        rng = torch.Generator().manual_seed(seed)
        head = self.model.head
        with torch.no_grad():
            bound = 1.0 / head.in_features**0.5
            head.weight.copy_(torch.empty_like(head.weight, device="cpu").uniform_(-bound, bound, generator=rng))
            head.bias.zero_()

    def batch(self, data: TextSet) -> dict[str, torch.Tensor]:
        """Tokenized ``input_ids`` / ``attention_mask``: int64 [n, T] on the learner's device.

        T = the longest row after truncation to ``max_length``; pair tasks go in as text pairs.
        Padding follows the tokenizer's side (right, as set by ``build_learner``).
        """
        enc = self.tokenizer(*self.text_inputs(data), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        keys = ("input_ids", "attention_mask", "token_type_ids") if self.pair_encoding == "segments" else ("input_ids", "attention_mask")
        return {k: enc[k].to(self.device) for k in keys}

    @functools.cached_property
    def pairs(self) -> PairEncoding:
        """The pair encoding of the family this body reads pairs as (``families.FAMILIES``): the
        decoder family's for a decoder model type or a body pooled at its last token, else the
        encoder family's (the scratch transformer's is the same). Fixed at first use."""
        decoder = self.model.pooling == "last" or is_decoder(getattr(self.model.body.config, "model_type", ""))
        return FAMILIES["decoder" if decoder else "encoder"].pair

    @functools.cached_property
    def pair_encoding(self) -> str:
        """How the two texts of a pair reach the body (part of ``signature``): ``template`` (the
        texts joined into one string by ``pairs``: decoders, since their tokenizers glue a pair
        with no separator), ``segments`` (the tokenizer's pair template with segment ids, for
        bodies that take ``token_type_ids``: BERT, MiniLM) or ``tokenizer`` (the tokenizer's pair
        template alone)."""
        if self.pairs.kind == "template":
            return "template"
        takes_segments = "token_type_ids" in inspect.signature(self.model.body.forward).parameters
        return "segments" if takes_segments and "token_type_ids" in self.tokenizer.model_input_names else "tokenizer"

    def text_inputs(self, data: TextSet) -> list[list[str]]:
        """The tokenizer's positional text arguments: one list of texts, or two for a pair task
        (one list of joined texts for decoders)."""
        columns = [list(c) for c in zip(*data.texts)]
        if len(columns) == 2 and self.pair_encoding == "template":
            return [[self.pairs.join(texts) for texts in data.texts]]
        return columns

    @torch.no_grad()
    def embed(self, data: TextSet, progress: bool = False) -> torch.Tensor:
        """Pooled features [n, hidden] in eval mode: the space K-means, K-centers and herding work in.

        Float32 on CPU, rows in ``data``'s order (batches are formed by text length); no dropout,
        and the previous train/eval mode is restored.
        """
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        out = torch.zeros(len(data), self.model.head.in_features)
        # batches of similar length: little compute goes to padding
        order = np.argsort([sum(len(t) for t in texts) for texts in data.texts], kind="stable")
        starts = range(0, len(data), self.embed_batch_size)
        for start in tqdm(starts, desc="embed", disable=not progress, leave=False):
            idx = order[start : start + self.embed_batch_size]
            out[torch.as_tensor(idx)] = self.model.features(**self.batch(data.select(idx))).float().cpu()
        self.model.train(was_training)
        return out


PAIR_ENCODING_VERSION = "pairs-v2"  # v2: segment ids for encoders, an explicit separator for decoders (families.FAMILIES)


def default_pooling(config) -> str:
    """``last`` for decoder models (``families.is_decoder``), else ``mean``."""
    return "last" if is_decoder(config.model_type, getattr(config, "is_decoder", False)) else "mean"


def keep_first_blocks(body: nn.Module, fraction: float) -> int:
    """Keep the first ``max(1, round(fraction x blocks))`` transformer blocks of ``body`` and drop
    the rest, in place (setting the config's ``num_hidden_layers``, which decoders loop over);
    the final norm stays. Returns the blocks kept.

    Why: a decoder's middle layers carry features that a small labelled set can use better than
    its last layer's, which are shaped for predicting the next token (benchmarks/README.md,
    "Learner protocols": SmolLM2-135M probes on held-out train rows, 15 of 30 blocks 65.4% vs
    all 30 60.7%, random SST-2 DPC-20 sets).
    """
    blocks = transformer_blocks(body)
    keep = max(1, round(fraction * len(blocks)))
    if keep < len(blocks):
        del blocks[keep:]
        body.config.num_hidden_layers = keep
    return keep


def build_learner(cfg: LearnerConfig, num_labels: int, seed: int, model_name: str | None = None, body_fraction: float | None = None) -> Learner:
    """The learner for ``num_labels`` classes, reset to ``seed`` (see ``Learner.reset``).

    ``model_name`` overrides ``cfg.model``; ``body_fraction`` keeps only the first blocks of the
    body (``keep_first_blocks``). The body is loaded in float32, the tokenizer pads on
    the right (EOS as pad when it has none). Raises UserError when the model cannot be loaded.
    """
    from transformers import AutoModel, AutoTokenizer

    name = model_name or cfg.model
    tokenizer = load_with_hint("learner.model", name, lambda p: AutoTokenizer.from_pretrained(p))
    body = load_with_hint("learner.model", name, lambda p: AutoModel.from_pretrained(p, dtype=torch.float32))
    if body_fraction is not None:
        keep_first_blocks(body, body_fraction)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    pooling = default_pooling(body.config) if cfg.pooling == "auto" else cfg.pooling
    model = Classifier(body, body.config.hidden_size, num_labels, pooling, cfg.dropout)
    learner = Learner(model, tokenizer, cfg.max_length, cfg.embed_batch_size, body_fraction)
    learner.reset(seed)
    return learner
