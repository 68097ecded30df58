"""In-context learning as a learner: ``icl:<causal LM>`` reads a distilled set as demonstrations.

DiLM (Sec. 4, in-context learning) also scores distilled sets as the demonstrations of a
causal LM's prompt. A job here builds a k-shot prompt from the set (all rows, or
``evaluate.icl_shots_per_class`` per label) in an order drawn from the job's seed, so the seeds
of a set are prompt orders; it predicts each validation row's label as the label name the LM
finds likeliest after the prompt (sum of the label's token log-probabilities, in nats). The
task's label names are the verbalizers (``not_duplicate`` reads "not duplicate"). An empty set
is the zero-shot reference: the instruction alone.

Cost: the prompt (instruction and demonstrations) is encoded once per job and its KV cache
reused for every validation row; all label names are scored in the same forward pass (one
position per row when every label name is one token, else one sequence per row and label).
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
import torch.nn.functional as F

from dilm_ray.data.dataset import TextSet
from dilm_ray.data.tasks import TaskSpec
from dilm_ray.families import FAMILIES
from dilm_ray.precision import prepare

PREFIX = FAMILIES["icl"].prefix  # "icl:"


def is_icl(name: str) -> bool:
    return name.startswith(PREFIX)


def verbalizers(task: TaskSpec) -> list[str]:
    """The words each label is predicted as: its name, underscores as spaces."""
    return [name.replace("_", " ") for name in task.label_names]


def instruction(task: TaskSpec) -> str:
    return f"Task: {task.name}. Answer each with one of: {', '.join(verbalizers(task))}.\n\n"


def render(task: TaskSpec, texts: tuple[str, ...], label: int | None) -> str:
    """One example: ``Sentence: ...\\nLabel: positive\\n\\n``; without a label it ends at ``Label:``.

    A pair is one ``Column: text`` line per text: the icl family's ``prompt`` pair encoding."""
    fields = "".join(f"{column.capitalize()}: {text}\n" for column, text in zip(task.text_columns, texts))
    return fields + "Label:" + ("" if label is None else f" {verbalizers(task)[label]}\n\n")


def demonstrations(data: TextSet, shots_per_class: int | None, seed: int) -> TextSet:
    """The set's rows (or ``shots_per_class`` per label, drawn with ``seed``) in an order drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(data))
    if shots_per_class is not None:
        idx = np.concatenate([rng.permutation(data.indices_of(y))[:shots_per_class] for y in np.unique(data.labels)]) if len(data) else idx
    return data.select(rng.permutation(idx))


def build_icl(name: str, precision: str = "fp32"):
    """(causal LM in eval mode, tokenizer) for ``icl:<model>`` (hub id, folder or embedded name).

    The LM is only read: frozen, and under ``bf16`` held in bfloat16 (run it under autocast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dilm_ray.models.registry import load_with_hint

    model_name = name.removeprefix(PREFIX)
    tokenizer = load_with_hint("learner", model_name, lambda p: AutoTokenizer.from_pretrained(p))
    model = load_with_hint("learner", model_name, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
    model.eval()
    model.requires_grad_(False)
    prepare(model, precision, next(model.parameters()).device)
    return model, tokenizer


@torch.inference_mode()
def icl_predict(model, tokenizer, task: TaskSpec, demos: TextSet, validation: TextSet, batch_size: int = 16) -> np.ndarray:
    """Predicted labels (int64 [n_validation]) of a causal LM prompted with ``demos``.

    The prompt ``instruction + demos`` is encoded once; its KV cache (batch 1) is copied and
    repeated for each batch of validation rows, which are right-padded after it with position
    ids continuing the prompt's. Scores are summed label-token log-probabilities (nats).
    """
    device = next(model.parameters()).device
    prompt = instruction(task) + "".join(render(task, t, int(y)) for t, y in zip(demos.texts, demos.labels))
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    base, head = model.base_model, model.get_output_embeddings()
    # transformers 5.x names the cache ``cache``; 4.x ``past_key_values``
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    prefix = getattr(base(input_ids=prompt_ids, use_cache=True), cache_kw)
    p = prompt_ids.shape[1]
    labels = [tokenizer(" " + v, add_special_tokens=False)["input_ids"] for v in verbalizers(task)]
    single = all(len(ids) == 1 for ids in labels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    preds = np.empty(len(validation), dtype=np.int64)
    # batches of rows of similar length: little compute goes to padding
    order = np.argsort([sum(len(t) for t in texts) for texts in validation.texts], kind="stable")
    for start in range(0, len(validation), batch_size):
        rows = order[start : start + batch_size].tolist()
        queries = [tokenizer(render(task, validation.texts[i], None), add_special_tokens=False)["input_ids"] for i in rows]
        # every label name is one token: one sequence per row; else one per (row, label)
        seqs = queries if single else [q + ids for q in queries for ids in labels]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), p + width), dtype=torch.long)
        mask[:, :p] = 1
        for n, s in enumerate(seqs):
            input_ids[n, : len(s)] = torch.tensor(s)
            mask[n, p : p + len(s)] = 1
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(seqs))
        positions = torch.arange(p, p + width).expand(len(seqs), -1)
        hidden = base(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=True, **{cache_kw: cache}
        ).last_hidden_state
        if single:
            last = torch.tensor([len(q) - 1 for q in queries], device=device)
            logp = F.log_softmax(head(hidden[torch.arange(len(queries), device=device), last]).float(), dim=-1)
            scores = logp[:, [ids[0] for ids in labels]]
        else:
            scores = torch.empty(len(queries), len(labels))
            for n, s in enumerate(seqs):
                b, j = divmod(n, len(labels))
                q = len(queries[b])
                logp = F.log_softmax(head(hidden[n, q - 1 : q - 1 + len(labels[j])]).float(), dim=-1)
                scores[b, j] = logp[torch.arange(len(labels[j])), torch.tensor(labels[j], device=device)].sum()
        preds[rows] = scores.argmax(-1).cpu().numpy()
    return preds
