"""Pairs reach every learner family as it expects them: segment ids for encoders, an explicit
separator for decoders (their tokenizers glue the two texts)."""

import numpy as np
import pytest
import torch

from dilm_ray.config import LearnerConfig
from dilm_ray.data import TextSet
from dilm_ray.families import FAMILIES
from dilm_ray.models.learner import build_learner
from tests.conftest import FILLER, NEG, POS, SPECIALS

PAIRS = TextSet(("premise", "hypothesis"), (("the movie was good", "a film is great"), ("bad plot", "the story was dull")), np.array([0, 2]))


@pytest.fixture(scope="module")
def segment_bert_dir(tmp_path_factory):
    """A tiny BERT whose tokenizer emits segment ids for pairs: <s> A </s> B </s>, 0...0 1...1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + NEG + POS + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    out = tmp_path_factory.mktemp("segment-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_an_encoder_gets_the_segment_ids_of_a_pair_and_they_change_its_features(segment_bert_dir):
    learner = build_learner(LearnerConfig(model=str(segment_bert_dir), max_length=32), 3, seed=0)
    assert learner.pair_encoding == "segments"
    batch = learner.batch(PAIRS)
    types, mask = batch["token_type_ids"][0], batch["attention_mask"][0]
    # <s> the movie was good </s> | a film is great </s>: 6 tokens of segment 0, then 5 of segment 1
    assert types[mask.bool()].tolist() == [0] * 6 + [1] * 5
    learner.model.eval()
    with torch.no_grad():
        ours = learner.model.features(**batch)
        flat = learner.model.features(batch["input_ids"], batch["attention_mask"])  # as if both texts were segment 0
    assert not torch.allclose(ours, flat)


def test_a_decoder_reads_a_pair_as_two_lines(tiny_lm_dir):
    learner = build_learner(LearnerConfig(model=str(tiny_lm_dir), max_length=32), 3, seed=0)
    assert learner.pair_encoding == "template" and "token_type_ids" not in learner.batch(PAIRS)
    assert learner.text_inputs(PAIRS) == [[FAMILIES["decoder"].pair.join(texts) for texts in PAIRS.texts]]
    assert learner.text_inputs(PAIRS)[0][0] == "the movie was good\na film is great"


def test_single_texts_are_read_as_before(segment_bert_dir):
    learner = build_learner(LearnerConfig(model=str(segment_bert_dir), max_length=32), 2, seed=0)
    single = TextSet(("sentence",), (("the movie was good",),), np.array([1]))
    batch = learner.batch(single)
    assert batch["token_type_ids"].sum() == 0
    learner.model.eval()
    with torch.no_grad():
        assert torch.allclose(learner.model.features(**batch), learner.model.features(batch["input_ids"], batch["attention_mask"]))
