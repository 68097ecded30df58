"""The generator: a causal LM with one BOS token per label and a separator for pair tasks.

DiLM Sec. 3.1 (label-conditioned LM); its per-sample LM losses weight the generated samples in
gradient matching (Sec. 3.2); its samples become the distilled sets (Sec. 3.3).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dilm_ray.config import GeneratorConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.data.tasks import TaskSpec
from dilm_ray.errors import GenerationError
from dilm_ray.models.blocks import train_top_blocks
from dilm_ray.models.registry import load_with_hint

SEP_TOKEN = "<sep>"


def bos_token(label: int) -> str:
    """The added token ``<bos_{label}>`` that starts every sample of ``label`` (DiLM Sec. 3.1)."""
    return f"<bos_{label}>"


@dataclass
class Generator:
    """A causal LM, its tokenizer and the token ids of the label-conditioned format (DiLM Sec. 3.1).

    ``bos_ids[label]`` is ``<bos_label>``'s id; ``max_length`` counts tokens of a whole encoded
    sample (prompt and EOS included); ``prefix`` is empty or the one sink token id.
    """

    model: nn.Module
    tokenizer: object
    task: TaskSpec
    max_length: int
    bos_ids: list[int]
    sep_id: int
    eos_id: int
    pad_id: int
    prefix: tuple[int, ...] = ()  # the attention-sink token before the label token (see build_generator)
    label_rows: nn.Parameter | None = None  # set by ``train_label_rows``: the label-token rows being trained
    adapted: bool = False  # set by ``add_lora``: the linear layers carry LoRA adapters
    packing: bool = True  # ``lm_losses`` packs samples into rows (``packed_batch``) where the LM allows it

    # ---- encoding -------------------------------------------------------------------
    def prompt(self, label: int) -> list[int]:
        """``[sink] <bos_label>``: what every sample of ``label`` starts with (``len(prefix) + 1`` ids).

        Raises IndexError for ``label >= num_labels``.
        """
        return [*self.prefix, self.bos_ids[label]]

    def encode(self, texts: tuple[str, ...], label: int) -> list[int]:
        """``[sink] <bos_label> text1 [<sep> text2] <eos>``, truncated to ``max_length``.

        Token ids, at most ``max_length`` of them; the text is cut, EOS is always kept last.
        """
        ids = self.prompt(label)
        for i, text in enumerate(texts):
            if i:
                ids.append(self.sep_id)
            ids += self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: self.max_length - 1] + [self.eos_id]

    def batch(self, data: TextSet) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` for a set of labelled samples.

        Both int64 [n, T] on CPU, T = the longest encoded row (<= ``max_length``); padding is
        ``pad_id`` with mask 0. Raises ValueError for an empty ``data``.
        """
        rows = [self.encode(t, int(y)) for t, y in zip(data.texts, data.labels)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def packed_batch(self, data: TextSet) -> dict[str, torch.Tensor]:
        """The samples of ``data`` packed into rows of ``max_length`` tokens, without padding between them.

        First-fit decreasing by length, so that every row holds whole samples; each sample's
        ``position_ids`` restart at 0, which is how ``transformers`` (>= 4.53: ``masking_utils``,
        GPT-2 and Llama families among others) keeps attention within a sample when no
        ``attention_mask`` and no cache is passed (``use_cache=False``). The tail of a row is ``pad_id`` with positions that continue
        its last sample's, so it opens no sequence of its own, and causal attention keeps the
        samples before it from reading it. Returns int64 [R, W] tensors on CPU, W <= ``max_length``:
        ``input_ids``, ``position_ids`` and ``sample_ids`` (the row of ``data`` each token
        belongs to, -1 on the tail). Raises ValueError for an empty ``data``.
        """
        rows = [self.encode(t, int(y)) for t, y in zip(data.texts, data.labels)]
        if not rows:
            raise ValueError("packed_batch of an empty set")
        bins: list[list[int]] = []
        room: list[int] = []
        for k in sorted(range(len(rows)), key=lambda k: (-len(rows[k]), k)):
            slot = next((b for b, free in enumerate(room) if free >= len(rows[k])), None)
            if slot is None:
                bins.append([])
                room.append(self.max_length)
                slot = len(bins) - 1
            bins[slot].append(k)
            room[slot] -= len(rows[k])
        width = self.max_length - min(room)
        ids = torch.full((len(bins), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        samples = torch.full((len(bins), width), -1, dtype=torch.long)
        for b, members in enumerate(bins):
            start = 0
            for k in members:
                n = len(rows[k])
                ids[b, start : start + n] = torch.tensor(rows[k])
                positions[b, start:] = torch.arange(width - start)  # the tail continues the last sample's
                samples[b, start : start + n] = k
                start += n
        return {"input_ids": ids, "position_ids": positions, "sample_ids": samples}

    def lm_losses(self, data: TextSet) -> torch.Tensor:
        """Per-sample mean token NLL of the text after the prompt (padding masked), differentiable
        w.r.t. the generator.

        Float32 [n] in nats/token on the generator's device, also under bf16 autocast (the
        logits are cast up before the log-softmax); the targets are the text tokens, ``<sep>``
        and EOS (not the label token). With ``packing`` (and an LM that keeps packed samples
        apart, ``packs_samples``) the body runs on ``packed_batch``'s rows, otherwise on right-padded
        ``batch`` rows: the same losses up to float rounding (fp32: ~1e-6 nats; with dropout, as in
        GPT-2 in train mode, the same in distribution: other shapes draw other masks), at the cost
        of the real tokens only (random SST-2 batches of 16 are ~57% padding). The LM loss of DiLM Sec. 3.1 and the
        input of the sample weights softmax(-loss / T) (Sec. 3.2)."""
        if self.packing and self.packs_samples:
            batch = {k: v.to(self.device) for k, v in self.packed_batch(data).items()}
            hidden = self.model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
            samples, positions = batch["sample_ids"], batch["position_ids"]
        else:
            batch = {k: v.to(self.device) for k, v in self.batch(data).items()}
            hidden = self.model.base_model(**batch).last_hidden_state
            rows = torch.arange(len(data), device=self.device)[:, None].expand_as(batch["input_ids"])
            samples = torch.where(batch["attention_mask"].bool(), rows, -1)
            positions = torch.arange(samples.shape[1], device=self.device).expand_as(samples)
        return sequence_nll(hidden, self.model.get_output_embeddings(), batch["input_ids"], samples, positions, len(data), skip=len(self.prefix))

    @functools.cached_property
    def packs_samples(self) -> bool:
        """Whether the LM keeps packed samples apart: two short samples packed in one row, and
        the second again in a row of its own with a padded tail, give each the hidden states it
        has alone (eval mode, autocast off, within 1e-4). Two rows, because some attention
        kernels (flash attention) detect packing only in a batch of one. Checked once per
        generator, by ``build_generator`` while the weights are fp32 (later, frozen weights may be
        held in bf16: ``precision.hold_frozen``); an LM that fails it, or raises, is padded
        (``lm_losses``)."""
        first = [*self.prompt(0), self.eos_id, self.eos_id]
        second = [*self.prompt(len(self.bos_ids) - 1), self.sep_id, self.eos_id, self.sep_id, self.eos_id]
        tail = len(first)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                body = self.model.base_model
                alone = [body(input_ids=torch.tensor([ids], device=self.device), use_cache=False).last_hidden_state[0] for ids in (first, second)]
                ids = torch.tensor([first + second, second + [self.pad_id] * tail], device=self.device)
                positions = torch.tensor([[*range(len(first)), *range(len(second))], [*range(len(second) + tail)]], device=self.device)
                packed = body(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        except Exception:  # noqa: BLE001  # any LM that cannot run this is padded, as before packing existed
            return False
        finally:
            self.model.train(was_training)
        expected = torch.cat(alone)
        return bool(torch.allclose(packed[0], expected, atol=1e-4, rtol=1e-4) and torch.allclose(packed[1, : len(second)], alone[1], atol=1e-4, rtol=1e-4))

    @property
    def device(self) -> torch.device:
        """The device of the LM's (first) parameter."""
        return next(self.model.parameters()).device

    # ---- sampling ---------------------------------------------------------------------
    @property
    def banned_ids(self) -> list[int]:
        """Tokens that never occur inside a sample: the prompt tokens, and ``<sep>`` in single-text tasks.

        Sorted token ids, never EOS.

        New tokens start as copies of existing rows, and only the label rows train, so with tied
        embeddings ``<sep>`` and the BOS it was copied from keep equal logits. Measured on the MNLI
        stage-1 generator (192 samples): 60% of the pairs malformed, most with BOS for ``<sep>``;
        14% with these tokens banned.
        """
        banned = {*self.prefix, *self.bos_ids} | (set() if self.task.is_pair else {self.sep_id})
        return sorted(banned - {self.eos_id})  # GPT-2's BOS is its EOS

    @property
    def constrained_room(self) -> int:
        """Tokens a constrained sample may take: what ``encode`` keeps between the prompt and EOS
        (``max_length - len(prompt) - 1``), so that no forced token is cut when the sample is scored."""
        return self.max_length - len(self.prompt(0)) - 1

    @functools.cached_property
    def sample_format(self) -> SampleFormat:
        """The task's format for constrained decoding: ``len(text_columns)`` parts joined by
        ``<sep>``, each opened by a token that decodes to visible text; a part before the last is
        cut at half (a third, ...) of the room after the prompt. Decodes every vocabulary entry
        once (~1 s for 49k tokens)."""
        parts = len(self.task.text_columns)
        room = self.constrained_room
        visible = torch.zeros(self.model.get_output_embeddings().weight.shape[0], dtype=torch.bool)  # rows past the tokenizer: never
        for i in range(min(len(self.tokenizer), len(visible))):
            visible[i] = bool(self.tokenizer.decode([i], skip_special_tokens=True).strip())
        visible[self.banned_ids] = False
        return SampleFormat(parts=parts, sep_id=self.sep_id, eos_id=self.eos_id, part_budget=max(1, (room - (parts - 1)) // parts), visible=visible)

    @torch.no_grad()
    def sample(self, label: int, n: int, cfg: GeneratorConfig, rng: torch.Generator, constrained: bool = False) -> list[list[int]]:
        """``n`` token sequences after the prompt (without it), cut at EOS.

        Each a list of at most ``max_length - len(prompt)`` ids (``constrained_room`` when
        constrained), EOS excluded; top-k/top-p
        sampling at ``cfg.temperature`` in batches of ``cfg.generate_batch_size``, drawn from
        ``rng`` (a CPU generator). ``constrained``: decode under ``sample_format`` (every
        sequence then has the task's number of non-empty parts; see ``constrain_logits``).
        Runs in eval mode and restores the previous mode.
        """
        out: list[list[int]] = []
        was_training = self.model.training
        self.model.eval()
        fmt = None
        if constrained:  # the vocabulary mask moves to the device once per call, not per step
            fmt = dataclasses.replace(self.sample_format, visible=self.sample_format.visible.to(self.device))
        for start in range(0, n, cfg.generate_batch_size):
            size = min(cfg.generate_batch_size, n - start)
            prompt = torch.tensor([self.prompt(label)] * size, dtype=torch.long, device=self.device)
            limit = self.constrained_room if constrained else self.max_length - prompt.shape[1]
            out += sample_tokens(
                self.model, prompt, limit, cfg.top_k, cfg.top_p, cfg.temperature, self.eos_id, rng, self.banned_ids, fmt
            )
        self.model.train(was_training)
        return out

    def parse(self, ids: list[int]) -> tuple[str, ...] | None:
        """Split generated ids into the task's columns; ``None`` for malformed samples.

        Malformed: a ``<sep>`` count that does not give ``len(task.text_columns)`` parts, or a
        part that decodes to an empty string (after ``strip``).
        """
        parts: list[list[int]] = [[]]
        for t in ids:
            if t == self.sep_id:
                parts.append([])
            else:
                parts[-1].append(t)
        if len(parts) != len(self.task.text_columns):
            return None
        texts = tuple(self.tokenizer.decode(p, skip_special_tokens=True).strip() for p in parts)
        return texts if all(texts) else None

    def generate(self, label: int, n: int, cfg: GeneratorConfig, rng: torch.Generator, max_attempts: int = 10) -> tuple[TextSet, int, int]:
        """``n`` well-formed samples of ``label``. Returns (set, dropped, constrained).

        ``cfg.constrained_decoding``: ``fallback`` samples freely and regenerates malformed samples
        (``parse``) for up to ``max_attempts`` rounds, then decodes what is still missing under the
        task's format (``sample_format``) for up to ``max_attempts`` more rounds; it turns to the
        format after the first round when that round keeps fewer than half its samples (rejection would then cost
        rounds for little: an 80-step MNLI generator kept 0 of 20). ``always`` decodes every round
        under it. Free sampling draws from the LM conditioned on a well-formed sample; constrained
        decoding bends each step toward the format, so it is the fallback by default. Runs whose
        first round keeps half or more and that finish within ``max_attempts`` rounds draw what
        earlier versions drew.

        The set has ``n`` rows labelled ``label``; ``dropped`` counts the malformed samples
        regenerated, ``constrained`` the kept samples decoded under constraints. Raises
        ``GenerationError`` (a ``UserError``) at once when ``max_length`` leaves no room for the
        format, and when every round together gives fewer than ``n``.
        """
        parts = len(self.task.text_columns)
        if self.constrained_room < 2 * parts - 1:
            raise GenerationError(
                f"generator.max_length={self.max_length} leaves {self.constrained_room} tokens after the prompt and before EOS: "
                f"too few for {parts} texts joined by <sep> (raise generator.max_length)"
            )
        texts: list[tuple[str, ...]] = []
        dropped = constrained = rounds = 0
        free_left = 0 if cfg.constrained_decoding == "always" else max_attempts
        constrained_left = max_attempts
        while len(texts) < n and (free_left or constrained_left):
            under = free_left == 0
            if under:
                constrained_left -= 1
            else:
                free_left -= 1
            rounds += 1
            for ids in self.sample(label, n - len(texts), cfg, rng, constrained=under):
                parsed = self.parse(ids)
                if parsed is None:
                    dropped += 1
                else:
                    texts.append(parsed)
                    constrained += under
            if rounds == 1 and not under and 2 * len(texts) < n:
                free_left = 0  # rejection would cost rounds for little: turn to the format now
        if len(texts) < n:
            raise GenerationError(
                f"the generator wrote only {len(texts)}/{n} well-formed samples of label {label} ({self.task.label_names[label]}) "
                f"in {rounds} rounds ({dropped} malformed): train stage 1 longer (pretrain.steps)"
            )
        return TextSet(self.task.text_columns, tuple(texts), np.full(n, label)), dropped, constrained

    def generate_all(self, per_label: int, cfg: GeneratorConfig, rng: torch.Generator, max_attempts: int = 10) -> tuple[TextSet, int, int]:
        """``generate`` for every label: ``per_label * num_labels`` rows grouped by label (0 first).

        Returns (set, total dropped, total constrained). The synthetic pool of DiLM Sec. 3.2 and
        the over-sampled generations of Sec. 3.3. Raises ``GenerationError`` as ``generate`` does.
        """
        parts, dropped, constrained = [], 0, 0
        for label in range(self.task.num_labels):
            part, d, c = self.generate(label, per_label, cfg, rng, max_attempts)
            parts.append(part)
            dropped += d
            constrained += c
        return TextSet.concat(parts), dropped, constrained

    # ---- training the label tokens ------------------------------------------------------
    def train_label_rows(self) -> nn.Parameter:
        """Train the ``<bos_label>`` rows as their own fp32 parameter [num_labels, hidden]; returns it.

        A forward hook on the input embedding puts the rows in place of the frozen table's at
        the label tokens (gradients reach them through the layers), and first copies them into
        the table, so the tied output head and ``save`` see the current rows. Why not a gradient
        mask on the whole table: that computes the [vocab, hidden] weight gradient and steps
        AdamW over all of it to move num_labels rows (SmolLM2: 28M entries, ~0.4 s of a 2-3 s
        stage-1 step here). The output side's gradient of the rows (label tokens are never
        targets, only in the softmax normaliser) is not taken. Calling it again returns the
        same parameter. The label tokens of DiLM Sec. 3.1.
        """
        if self.label_rows is not None:
            return self.label_rows
        embedding = self.model.get_input_embeddings()
        ids = torch.tensor(self.bos_ids, device=embedding.weight.device)
        rows = nn.Parameter(embedding.weight.detach()[ids].float().clone())

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                module.weight[ids] = rows.detach().to(module.weight.dtype)
            hits = args[0].unsqueeze(-1) == ids  # [B, T, num_labels]
            if not bool(hits.any()):
                return out
            # F.embedding, not rows[index]: indexing's backward accumulates the many repeated
            # indices with atomic adds in any order on 2+ CPU threads (index_put_), so the rows'
            # gradient, and with it stage 1, changed from run to run in the last bits; the
            # embedding backward sums each row's hits in index order (measured: 11 distinct
            # gradients in 20 runs of the same step, against 1)
            return torch.where(hits.any(-1, keepdim=True), F.embedding(hits.long().argmax(-1), rows).to(out.dtype), out)

        embedding.register_forward_hook(hook)
        self.label_rows = rows
        return rows

    # ---- low-rank adapters ---------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None, seed: int, resume: dict[str, torch.Tensor] | None = None) -> list[nn.Parameter]:
        """Freeze the LM and put rank-``rank`` LoRA adapters (PEFT) on every linear layer of its blocks; returns their parameters.

        Each adapted weight W [out, in] (GPT-2's Conv1D: [in, out], transposed alike) computes
        with W + (alpha / rank) B A, A [rank, in] drawn from ``seed`` alone and B [out, rank]
        zero, so the LM is unchanged until the first step.
        Why ``seed`` and not the global RNG: that one is offset by rank, and data-parallel workers
        must start from the same adapters for averaged gradients to keep them equal. The output
        head (tied to the input embeddings in SmolLM2 and GPT-2) is not adapted. Adapters are
        fp32 like every trained parameter; ``alpha`` None means 2 x ``rank``.

        ``resume``: an ``adapter_state()`` taken when the checkpoint this generator was loaded
        from was ``save``d. ``save`` merges the adapters into the weights, so their delta is
        subtracted back from those weights and the adapters take the saved values: the resumed
        LM computes what the saved one did (to fp32 rounding; exactly once bf16 holds the weights). Call before ``precision.prepare`` (the weights are
        still fp32 then).

        Beyond DiLM (which fine-tunes all of GPT-2): LoRA, Hu et al. 2022. Raises RuntimeError
        when the generator already has adapters and ValueError when ``resume`` does not name
        exactly the adapter parameters.
        """
        from peft import LoraConfig, inject_adapter_in_model

        if self.adapted:
            raise RuntimeError("the generator already has LoRA adapters")
        for p in self.model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules="all-linear", lora_dropout=0.0, bias="none")
        # only the CPU generator, forked and restored (torch.manual_seed would also reseed CUDA
        # for good): PEFT draws the adapters on CPU, then moves them to the layer's device
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            inject_adapter_in_model(config, self.model)
        self.adapted = True
        params = dict((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        if resume is not None:
            if set(resume) != set(params):
                raise ValueError(f"adapter state names {len(set(resume) ^ set(params))} parameters this generator's adapters do not have")
            with torch.no_grad():
                for name, value in resume.items():
                    params[name].copy_(value)
                for layer in _lora_layers(self.model):
                    weight = layer.get_base_layer().weight
                    weight -= layer.get_delta_weight("default").to(weight.dtype)
        return list(params.values())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter parameters by name (live tensors, not copies); empty without ``add_lora``."""
        if not self.adapted:
            return {}
        return {n: p.detach() for n, p in self.model.named_parameters() if ".lora_" in n}

    def save(self, directory) -> None:
        """Write the LM (safetensors) and the tokenizer, added tokens included, to ``directory``.

        Trained label rows (``train_label_rows``) are copied into the embedding first; a table
        held in bf16 (``precision.hold_frozen``) is saved as it is held. LoRA adapters
        (``add_lora``) are merged: each adapted weight is written as W + (alpha / rank) B A in
        fp32 under its plain name, so the folder is an ordinary checkpoint of the base
        architecture (later stages and ``build_generator`` load it as any other); the model in
        memory keeps its adapters unmerged."""
        if self.label_rows is not None:
            embedding = self.model.get_input_embeddings()
            with torch.no_grad():
                embedding.weight[self.bos_ids] = self.label_rows.detach().to(embedding.weight.dtype)
        state = merged_state_dict(self.model) if self.adapted else None
        self.model.save_pretrained(str(directory), safe_serialization=True, state_dict=state)
        self.tokenizer.save_pretrained(str(directory))


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with its LoRA adapters merged: names of the unadapted model, each
    adapted weight W + delta in fp32 (added to a bf16-held W in bf16, every delta element under
    half a bf16 step of its weight would be lost in the file), other tensors as held. Tied
    tensors stay one tensor. A later stage run in bf16 holds these weights in bf16 (as it runs
    every frozen weight), which is bf16 inference of the merged model."""
    adapted = {id(m) for m in _lora_layers(model)}
    merged = {}
    for name, module in model.named_modules():
        if id(module) in adapted:
            base = module.get_base_layer()
            merged[f"{name}.weight"] = base.weight.float() + module.get_delta_weight("default").float()
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out[plain] = merged.get(plain, value)
    return out


def sequence_nll(
    hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor, sample_ids: torch.Tensor, position_ids: torch.Tensor, n: int, skip: int = 0
) -> torch.Tensor:
    """Mean next-token NLL per sample over its targets after its first ``skip``: float32 [n].

    ``hidden``: the LM body's last hidden states [R, T, H]; ``head``: the output layer (logits =
    ``head(hidden)``, as in GPT-2 and Llama-family LMs); ``input_ids``, ``sample_ids`` (the
    sample, in ``range(n)``, each token belongs to; -1 for padding) and ``position_ids`` (the
    token's position in its sample): int64 [R, T]. A token is a target when the token before it
    is of the same sample and its position is past ``skip``. Rows may hold one padded sample
    (``Generator.batch``) or several packed ones (``Generator.packed_batch``). In nats/token; a
    sample with no target gives 0.

    The head and the log-softmax run only at the target positions, in fp32: short texts padded
    to a batch's longest (random SST-2 rows: ~57% padding) would otherwise pay the
    vocabulary-wide product and softmax for every pad.
    """
    target = sample_ids[:, 1:]
    rows, cols = ((target >= 0) & (target == sample_ids[:, :-1]) & (position_ids[:, 1:] > skip)).nonzero(as_tuple=True)
    logits = head(hidden[:, :-1][rows, cols]).float()  # [N, V], N = target tokens
    nll = F.cross_entropy(logits, input_ids[:, 1:][rows, cols], reduction="none")
    owner = target[rows, cols]
    sums = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, owner, nll)
    counts = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, owner, torch.ones_like(nll))
    return sums / counts.clamp_min(1)


@dataclass(frozen=True)
class SampleFormat:
    """What a well-formed sample is, for constrained decoding: ``parts`` texts of at least one
    token each, joined by ``sep_id``, ended by ``eos_id``; a part before the last gets at most
    ``part_budget`` tokens before ``<sep>`` is forced."""

    parts: int
    sep_id: int
    eos_id: int
    part_budget: int
    visible: torch.Tensor | None = None  # bool [V]: the token decodes to text that is not blank; None: every token


def constrain_logits(logits: torch.Tensor, fmt: SampleFormat, part: torch.Tensor, part_len: torch.Tensor, remaining: int) -> torch.Tensor:
    """Next-token logits with what would break ``fmt`` set to -inf (a new tensor).

    ``logits``: float [B, V]; ``part``: int64 [B], the 0-based part each row is writing;
    ``part_len``: int64 [B], tokens already in that part; ``remaining``: tokens each row may
    still generate, this one included. Per row: a part's first token must be ``visible`` (so
    ``<sep>``, EOS, special and blank tokens cannot open a part: every part decodes to text);
    EOS is forbidden before the last part; ``<sep>`` in the last part; and ``<sep>`` is forced
    (every other logit -inf) once a non-empty part before the last holds ``part_budget`` tokens or
    the remaining room only just fits a ``<sep>`` and one token for every part still to come. So a
    sequence sampled under it always splits into ``parts`` runs that each decode to text. The
    format of DiLM Sec. 3.1 (label token, texts joined by a separator), enforced at decoding time.
    """
    neg = float("-inf")
    last, empty = part >= fmt.parts - 1, part_len == 0
    out = logits.clone()
    if fmt.visible is not None and bool(empty.any()):
        out = out.masked_fill(empty[:, None] & ~fmt.visible[None], neg)
    out[:, fmt.eos_id] = out[:, fmt.eos_id].masked_fill(~last | empty, neg)
    if fmt.parts > 1:
        out[:, fmt.sep_id] = out[:, fmt.sep_id].masked_fill(last | empty, neg)
        force = ~last & ~empty & ((part_len >= fmt.part_budget) | (remaining <= 2 * (fmt.parts - 1 - part)))
        if bool(force.any()):
            out[force] = neg
            out[force, fmt.sep_id] = 0.0
    return out


def top_k_top_p_probs(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus sampling restricted to the top-k tokens: (probabilities [B,k], token ids [B,k]).

    ``logits``: float [B, V] (already divided by the temperature); k = min(top_k, V). The
    probabilities keep the logits' dtype and sum to 1 per row; ids are int64, most likely first.
    Sorting only k candidates instead of the whole vocabulary is what makes this fast on CPU.
    """
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = values.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    probs = probs.masked_fill(before >= top_p, 0.0)  # the most likely token always survives
    return probs / probs.sum(-1, keepdim=True), indices


def sample_tokens(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    top_k: int,
    top_p: float,
    temperature: float,
    eos_id: int,
    rng: torch.Generator,
    banned: Sequence[int] = (),
    fmt: SampleFormat | None = None,
) -> list[list[int]]:
    """Sample continuations with the KV cache; sequences stop at EOS (excluded from the output).
    ``banned`` tokens are never sampled; with ``fmt`` every step is decoded under
    ``constrain_logits`` (None: free sampling, the draws of earlier versions unchanged).

    ``prompt``: int64 [B, P] on the model's device, every row the same length. Returns B lists of
    at most ``max_new_tokens`` ids; ``rng`` is a CPU generator (sampling runs on CPU).

    Finished rows leave the batch and the cache: short texts (most SST-2 phrases are under 15
    tokens) then stop paying for the longest one in their batch.
    """
    # transformers 5.x names the cache ``cache``; 4.x ``past_key_values``
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    past, logits = getattr(out, cache_kw), out.logits[:, -1]
    tokens = torch.full((prompt.shape[0], max_new_tokens), eos_id, dtype=torch.long)
    active = torch.arange(prompt.shape[0])  # rows of ``tokens`` still generating
    banned = torch.as_tensor(list(banned), dtype=torch.long, device=logits.device)
    part = torch.zeros(prompt.shape[0], dtype=torch.long, device=logits.device)  # per active row: the part being written
    part_len = torch.zeros_like(part)  # and its tokens so far
    for step in range(max_new_tokens):
        logits = logits.index_fill(-1, banned, float("-inf"))
        if fmt is not None:
            logits = constrain_logits(logits, fmt, part, part_len, max_new_tokens - step)
        probs, ids = top_k_top_p_probs(logits.float() / temperature, top_k, top_p)
        choice = torch.multinomial(probs.cpu(), 1, generator=rng).to(ids.device)
        token = ids.gather(-1, choice).squeeze(-1)
        tokens[active, step] = token.cpu()
        if fmt is not None:
            new_part = token == fmt.sep_id
            part, part_len = part + new_part.long(), torch.where(new_part, 0, part_len + 1)
        going = token != eos_id
        if not bool(going.any()) or step == max_new_tokens - 1:
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(-1)
            active, token = active[keep.cpu()], token[keep]
            part, part_len = part[keep], part_len[keep]
            past.batch_select_indices(keep)
        out = model(input_ids=token[:, None], use_cache=True, **{cache_kw: past})
        past, logits = getattr(out, cache_kw), out.logits[:, -1]
    seqs = tokens.tolist()
    return [s[: s.index(eos_id)] if eos_id in s else s for s in seqs]


def set_trainable(
    gen: Generator, cfg: GeneratorConfig, label_tokens: bool, seed: int = 0, adapter: dict[str, torch.Tensor] | None = None
) -> list[nn.Parameter]:
    """Choose what trains: LoRA adapters on every layer (``cfg.lora_rank``), else the top
    ``cfg.train_top_layers`` blocks and the final norm, else every parameter; optionally the
    label-token rows too.

    The label BOS rows of the (possibly tied) embedding train as their own parameter
    (``Generator.train_label_rows``), so the rest of the vocabulary stays as pre-trained. With
    every parameter training (``lora_rank`` and ``train_top_layers`` None) they train with the
    table and ``label_tokens`` has no effect. ``seed`` draws the adapters and ``adapter``
    resumes them (``Generator.add_lora``).

    Returns the parameters to optimise. Stage 1 (Sec. 3.1) trains the label tokens; stage 2
    (Sec. 3.2) not. Raises ValueError as ``blocks.transformer_blocks`` and ``Generator.add_lora`` do.
    """
    if cfg.lora_rank is not None:
        trainable = gen.add_lora(cfg.lora_rank, cfg.lora_alpha, seed, adapter)
    else:
        trainable = train_top_blocks(gen.model, cfg.train_top_layers)
        if cfg.train_top_layers is None:
            return trainable
    if label_tokens:
        rows = gen.train_label_rows()
        rows._dilm_no_decay = True  # embeddings take no weight decay
        trainable.append(rows)
    return trainable


@torch.no_grad()
def init_new_tokens(model: nn.Module, tokenizer, task: TaskSpec, label_init: str, added: set[str]) -> None:
    """Initial embeddings of the ``added`` tokens: ``<sep>`` starts as BOS. ``<bos_i>`` starts as the mean embedding of label i's name
    (``label_name``) or as BOS (``bos``).

    Why label names: when only the top layers train (CPU profiles), the label can reach them
    only through the frozen lower layers, so the label tokens must differ from the start.
    Copies of BOS moved by 0.10 in 360 LM steps (tokens are ~3.7 apart) and the generator
    ignored the label.

    Writes the rows in place in the input and output embeddings (one tensor when tied).
    The label tokens are DiLM's per-label BOS tokens (Sec. 3.1).
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    vocab = tokenizer.get_vocab()
    sources = [[bos] for _ in task.label_names]
    if label_init == "label_name":
        sources = [tokenizer(" " + name.replace("_", " "), add_special_tokens=False)["input_ids"] or [bos] for name in task.label_names]
    pairs = [(t, src) for t, src in zip([*(bos_token(i) for i in range(task.num_labels)), SEP_TOKEN], [*sources, [bos]]) if t in added]
    for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
        for token, source in pairs:
            emb.weight[vocab[token]] = emb.weight[source].mean(0)


def sink_token_id(tokenizer) -> int:
    """The token put before ``<bos_i>``: the LM's own BOS (else EOS).

    Pre-trained LMs park huge activations on the first position whatever its token (an attention
    sink); measured on SmolLM2, ``<bos_i>`` there differed 0.04 (relative) between labels after
    the 22 frozen layers, 0.39 behind a sink token (benchmarks/label_signal.py): the label would
    barely reach the trained top layers.

    None when the tokenizer has neither a BOS nor an EOS token.
    """
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def build_generator(cfg: GeneratorConfig, task: TaskSpec, model_name: str | None = None) -> Generator:
    """Load the LM and add ``<bos_i>`` per label and ``<sep>`` (see ``init_new_tokens``).

    ``model_name`` overrides ``cfg.model`` (e.g. a stage-1 checkpoint, which already has the
    tokens). The LM is loaded in float32. DiLM Sec. 3.1. Raises UserError when the model cannot
    be loaded (``load_with_hint``) and ValueError when its tokenizer has no EOS token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = model_name or cfg.model
    tokenizer = load_with_hint("generator.model", name, lambda p: AutoTokenizer.from_pretrained(p))
    model = load_with_hint("generator.model", name, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
    new_tokens = [bos_token(i) for i in range(task.num_labels)] + [SEP_TOKEN]
    missing = {t for t in new_tokens if t not in tokenizer.get_vocab()}  # none in a DiLM checkpoint
    if missing:
        tokenizer.add_tokens([t for t in new_tokens if t in missing], special_tokens=True)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_new_tokens(model, tokenizer, task, cfg.label_init, missing)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"generator '{name}' has no EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    vocab = tokenizer.get_vocab()
    gen = Generator(
        model=model,
        tokenizer=tokenizer,
        task=task,
        max_length=cfg.max_length,
        bos_ids=[vocab[bos_token(i)] for i in range(task.num_labels)],
        sep_id=vocab[SEP_TOKEN],
        eos_id=eos,
        pad_id=pad,
        prefix=(sink_token_id(tokenizer),) if cfg.sink_token else (),
        packing=cfg.packing,
    )
    if cfg.packing:
        gen.packs_samples  # checked now, while every weight is fp32  # noqa: B018
    return gen
