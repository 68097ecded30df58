"""Every learner family, named once.

A family is what ``family_of`` classifies a learner name as (the ``family`` column of every
evaluation row), the ``evaluate.<section>`` protocol its learners train under, its built-in
learner names and how its learners read the two texts of a pair. The evaluator
(``evaluation.learners``: ``describe``, ``family_config``, the TF-IDF learner), the learner
(``models.learner``: pooling and pair encoding), ``evaluation.job`` (the protocol sections),
the config's description of ``evaluate.learners`` and ``benchmarks/glue.py`` (``--learner all``)
derive their names from ``FAMILIES``: adding a family means adding it here and to the code
that builds its learners.

This module imports nothing from the package, so every layer can read it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SCRATCH = "scratch-transformer"  # the from-scratch learner: its own family
TFIDF = "tfidf-logreg"  # word n-gram TF-IDF + logistic regression: its own family


@dataclass(frozen=True)
class PairEncoding:
    """How a family's learners read the two texts of a pair (single texts reach every family as they are).

    ``tokenizer``: the two texts go to the tokenizer as a text pair, which applies its pair
    template (``[CLS] a [SEP] b [SEP]`` for BERT/MiniLM), with segment ids where body and
    tokenizer take them (``Learner.pair_encoding`` says ``segments`` or ``tokenizer``);
    ``template``: one string, the texts joined by ``separator`` (decoders: their tokenizers
    glue a pair with no separator; TF-IDF: it reads one string); ``prompt``: one
    ``Column: text`` line per text column of the prompt (``evaluation.icl.render``).
    """

    kind: Literal["tokenizer", "template", "prompt"]
    separator: str | None = None  # ``template`` only

    def join(self, texts: Sequence[str]) -> str:
        """One string from a row's texts (1 or 2): joined by ``separator``, so a single text is unchanged.

        Raises ValueError for an encoding that does not join texts (``tokenizer``, ``prompt``)."""
        if self.separator is None:
            raise ValueError(f"the '{self.kind}' pair encoding does not join texts into one string")
        return self.separator.join(texts)


TOKENIZER_PAIRS = PairEncoding("tokenizer")


@dataclass(frozen=True)
class Family:
    """A learner family.

    ``name``: what ``family_of`` returns it as (table labels, the rows' ``family`` column);
    ``section``: the ``evaluate.<section>`` protocol its learners train under, None for none
    (TF-IDF, in-context learners); ``builtins``: the built-in learner names of the family;
    ``model_types``: config.json ``model_type`` values that make a local model this family;
    ``prefix``: learner names starting with it are this family (``icl:<LM>``); ``pair``: how
    its learners read a pair, None when it is known only once the model is loaded.
    """

    name: str
    description: str
    section: str | None
    pair: PairEncoding | None
    builtins: tuple[str, ...] = ()
    model_types: frozenset[str] = frozenset()
    prefix: str | None = None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("encoder", "a pretrained bidirectional encoder (BERT, MiniLM)", "encoder", TOKENIZER_PAIRS, builtins=("minilm-l6",)),
        Family(
            "decoder",
            "a pretrained causal LM (last-token pooling unless its protocol sets one)",
            "decoder",
            PairEncoding("template", "\n"),  # two lines: the tokenizer would glue the texts
            builtins=("smollm2-135m",),
            model_types=frozenset({"llama", "gpt2", "mistral", "qwen2", "gpt_neox", "opt", "phi", "gemma", "smollm3"}),
        ),
        Family(SCRATCH, "a small BERT with random weights, on the MiniLM tokenizer", "scratch", TOKENIZER_PAIRS, builtins=(SCRATCH,)),
        # "[SEP]" is read as the word "sep": it marks the seam for the bigrams across it
        Family(TFIDF, "word 1-2 gram TF-IDF + logistic regression", None, PairEncoding("template", " [SEP] "), builtins=(TFIDF,)),
        # a hub id is not downloaded to classify it: the encoder's protocol, the pair encoding of what loads
        Family("hub/local", "a hub id or unreadable folder, trained as an encoder", "encoder", None),
        Family("icl", "a causal LM prompted with the set as demonstrations", None, PairEncoding("prompt"), prefix="icl:"),
    )
}

LEARNER_KINDS: dict[str, str] = {name: f.name for f in FAMILIES.values() for name in f.builtins}  # built-in learner -> family
PROTOCOL_SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(f.section for f in FAMILIES.values() if f.section))  # evaluate.<section>
DECODER_TYPES: frozenset[str] = FAMILIES["decoder"].model_types


def is_decoder(model_type: str | None, decoder_flag: bool = False) -> bool:
    """Whether a model config (its ``model_type`` and ``is_decoder`` flag) is a decoder's."""
    return bool(decoder_flag) or model_type in DECODER_TYPES


def family_of(name: str) -> Family:
    """The family of a learner name, without loading a model.

    Built-in names map through ``LEARNER_KINDS``, prefixed names (``icl:``) to their family; a
    local folder is classified from its config.json (``is_decoder``); anything else, and a
    folder whose config.json cannot be read, is "hub/local". Never raises.
    """
    if name in LEARNER_KINDS:
        return FAMILIES[LEARNER_KINDS[name]]
    for family in FAMILIES.values():
        if family.prefix and name.startswith(family.prefix):
            return family
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        try:
            meta = json.loads(config.read_text())
        except (OSError, ValueError):
            return FAMILIES["hub/local"]
        return FAMILIES["decoder" if is_decoder(meta.get("model_type"), meta.get("is_decoder", False)) else "encoder"]
    return FAMILIES["hub/local"]
