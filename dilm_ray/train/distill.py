"""Stage 2: train the generator so that its samples' learner gradients match real ones (DiLM Sec. 3.2, Alg. 1)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dilm_ray.algorithm.matching import match_loss, sample_weights, weighted_grad
from dilm_ray.algorithm.selection import LabelFilter, consistent_mask, embedding_classifier, kmeans, label_consistent, nearest_to_centers
from dilm_ray.config import DistillConfig, GeneratorConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.models.generator import Generator
from dilm_ray.models.learner import Learner
from dilm_ray.precision import prepare
from dilm_ray.tracking.loggers import MetricLogger, NullLogger
from dilm_ray.train.gradients import learner_grads
from dilm_ray.train.loop import set_up_loop
from dilm_ray.train.runtime import Runtime
from dilm_ray.train.state import TrainState, crossed


def representative_teachers(embeddings: torch.Tensor, labels: np.ndarray, num_labels: int, n_sets: int, dpc: int, seed: int) -> list[np.ndarray]:
    """Per label, the union of ``n_sets`` K-means representative sets (one point per cluster).

    ``embeddings``: float [n, d] (CPU) of the train rows; ``labels``: int64 [n]. Returns
    ``num_labels`` int64 arrays of train-row indices, each of length ``n_sets * min(dpc, |label|)``
    (a row may recur across sets). The representative teachers of DiLM Sec. 3.2. Raises
    ValueError (from ``kmeans``) for a label without train rows.
    """
    per_label = []
    for label in range(num_labels):
        idx = np.flatnonzero(labels == label)
        k = min(dpc, len(idx))
        picks = [idx[nearest_to_centers(embeddings[idx], kmeans(embeddings[idx], k, seed + r)[0]).numpy()] for r in range(n_sets)]
        per_label.append(np.concatenate(picks))
    return per_label


def cluster_batches(assign: torch.Tensor, k: int, n_batches: int, seed: int) -> list[list[int]]:
    """``n_batches`` batches with one index from each of the ``k`` clusters, without replacement
    inside a cluster until it is exhausted (then it is reshuffled).

    ``assign``: int64 [n] cluster ids (CPU). Indices are rows of ``assign``; empty clusters are
    skipped, so a batch has one index per non-empty cluster (<= ``k``)."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(assign.numpy() == j) for j in range(k)]
    members = [m for m in members if len(m)]
    queues = [list(rng.permutation(m)) for m in members]
    batches = []
    for _ in range(n_batches):
        batch = []
        for j, queue in enumerate(queues):
            if not queue:
                queue.extend(rng.permutation(members[j]))
            batch.append(int(queue.pop()))
        batches.append(batch)
    return batches


def pool_batches(
    embeddings: torch.Tensor, labels: torch.Tensor, num_labels: int, k: int, n_batches: int, seed: int, proba: torch.Tensor | None = None
) -> list[list[list[int]]]:
    """Per label, cluster the generated pool into ``k`` K-means clusters and draw ``n_batches``
    batches of one row per cluster (``cluster_batches``): the synthetic batches of DiLM Sec. 3.2.

    ``embeddings``: float [n, hidden] (CPU) of the pool rows; ``labels``: int64 [n], the label
    each row was generated for. ``proba`` (beyond the paper, ``distill.label_filter``): float
    [n, num_labels], the label filter's class probabilities; only rows it finds consistent with
    their label are clustered (``label_consistent``, topped up to ``k`` per label). Returns
    ``batches[label][b]``: pool row indices. Raises ValueError (from ``kmeans``) for a label
    without rows.
    """
    candidates = np.arange(len(labels)) if proba is None else label_consistent(labels, proba, k).numpy()
    candidate_labels = labels.numpy()[candidates]
    batches = []
    for label in range(num_labels):
        idx = candidates[candidate_labels == label]
        _, assign = kmeans(embeddings[idx], min(k, len(idx)), seed + label)
        batches.append([[int(i) for i in idx[b]] for b in cluster_batches(assign, k, n_batches, seed + label)])
    return batches


class Cycle:
    """Endless batches of ``size`` indices drawn from ``indices``, reshuffled by ``rng`` at each pass.

    ``indices``: int64 [n] (rows of a ``TextSet``); ``size`` >= 1 may exceed n (a batch then
    spans passes). Stage 2's source of real teacher, learner and LM batches; draws from ``rng`` only
    when a pass is used up.
    """

    def __init__(self, indices: np.ndarray, size: int, rng: np.random.Generator):
        self.indices, self.size, self.rng, self.queue = indices, size, rng, np.empty(0, dtype=np.int64)

    def next(self) -> np.ndarray:
        """The next ``size`` indices (int64 [size]); a batch may span two passes."""
        while len(self.queue) < self.size:
            self.queue = np.concatenate([self.queue, self.rng.permutation(self.indices)])
        out, self.queue = self.queue[: self.size], self.queue[self.size :]
        return out


@dataclass(frozen=True)
class DistillInputs:
    """What stage 2 needs besides the generator and the learner.

    ``train``: the real train set (teachers, learner inner loop, LM batches); ``cfg`` /
    ``gen_cfg``: the ``distill`` and ``generator`` sections; ``seed``: the run's seed (LoRA
    adapters come from it as is, everything else from ``seed + 1000 x rank``);
    ``teacher_embeddings``: float [len(train), hidden] from the learner's pretrained body
    (``train_embeddings``), None: ``learner.embed(train)`` at the start.
    """

    train: TextSet
    cfg: DistillConfig
    gen_cfg: GeneratorConfig
    seed: int
    teacher_embeddings: torch.Tensor | None = None


def distill(
    gen: Generator,
    learner: Learner,
    inputs: DistillInputs,
    *,
    runtime: Runtime = Runtime(),
    logger: MetricLogger = NullLogger(),
    state: TrainState | None = None,
    on_outer_loop: Callable[[TrainState, dict[str, float]], None] | None = None,
) -> TrainState:
    """Gradient matching (DiLM Alg. 1). Each worker has its own learner and synthetic pool
    (seeds offset by rank); generator gradients are averaged across workers (``GradientSync``).

    Per outer loop: (re)generate the pool every ``cfg.generate_interval`` loops, reset the learner,
    then ``cfg.inner_loop`` generator steps on (1 - lm_lambda) * matching loss (+ lm_lambda * LM
    loss), with ``cfg.learner_steps`` learner updates on real data between them (Sec. 3.2);
    ``cfg`` is ``inputs.cfg``. ``state`` resumes a checkpointed run (``set_up_loop``).
    ``on_outer_loop`` gets the state after every outer loop, and at log steps (an empty dict
    otherwise) the summary of the loops since the last one, which is also logged. Log steps are
    the first step at or past each multiple of ``cfg.log_every`` (``crossed``), and the last.
    The summary: ``match_loss`` (in [0, 2]), ``grad_sim``
    (in [-1, 1]), ``syn_lm_loss`` / ``lm_loss`` (nats/token), ``dropped_samples`` and
    ``constrained_samples`` (counts per pool, ``Generator.generate``),
    ``seconds_*`` (cumulative seconds) and ``lr``, averaged over workers; with
    ``cfg.label_filter`` also ``pool_consistent`` (fraction of pool rows the filter kept). Forward passes run in
    ``runtime.precision`` (bf16: autocast, frozen generator layers held in bf16, fp32 master
    weights; head gradients, sample weights and the matching loss in fp32). Returns the state with
    ``step == cfg.steps``. Raises ``GenerationError`` when the generator cannot produce well-formed samples.
    """
    train, cfg, gen_cfg = inputs.train, inputs.cfg, inputs.gen_cfg
    num_labels = gen.task.num_labels
    seed = inputs.seed + 1000 * runtime.rank
    params, optimizer, scheduler, state, rng = set_up_loop(gen, gen_cfg, cfg, runtime, state, seed=inputs.seed, rng_seed=seed, label_tokens=False)
    prepare(learner.model.body, runtime.precision, runtime.device)
    torch_rng = torch.Generator().manual_seed(seed + state.step)

    emb = inputs.teacher_embeddings if inputs.teacher_embeddings is not None else learner.embed(train, progress=runtime.is_main)
    teachers = representative_teachers(emb, train.labels, num_labels, cfg.n_repset, cfg.repset_dpc, seed)
    # the label filter's reference classifier (beyond the paper): fitted on the same embeddings
    # the teachers come from, i.e. the learner's pretrained body
    label_filter = embedding_classifier(emb, train.labels, seed) if cfg.label_filter else None
    real_batches = [Cycle(t, cfg.gm_real_dpc, rng) for t in teachers]
    learner_batches = Cycle(np.arange(len(train)), cfg.learner_batch_size, rng)
    lm_batches = Cycle(np.arange(len(train)), cfg.lm_batch_size, rng)

    outer_loops = cfg.steps // cfg.inner_loop
    first = state.step // cfg.inner_loop
    syn_batches: list[list[list[int]]] = []
    pool: TextSet | None = None
    bar = tqdm(range(first, outer_loops), desc="distill", disable=not runtime.is_main, initial=first, total=outer_loops)
    history: list[dict[str, float | torch.Tensor]] = []
    with runtime.gradient_sync(params) as sync:
        for ol in bar:
            # seconds spent per phase since step 0, kept across resumes: where stage 2's time goes
            seconds = state.extra.setdefault("seconds", {"seconds_generate": 0.0, "seconds_match": 0.0, "seconds_inner_loop": 0.0})
            start = time.perf_counter()
            if pool is None or (ol - first) % cfg.generate_interval == 0:
                if label_filter is not None:
                    learner.reset(seed + ol)  # the filter reads pretrained-body embeddings, as it was fitted on
                with runtime.autocast():
                    pool, syn_batches, dropped, constrained, consistent = _synthetic_pool(gen, learner, cfg, gen_cfg, torch_rng, seed + ol, label_filter)
                history.append({
                    "dropped_samples": float(dropped), "constrained_samples": float(constrained),
                    **({"pool_consistent": consistent} if label_filter is not None else {}),
                })
            seconds["seconds_generate"] += time.perf_counter() - start
            learner.reset(seed + ol)
            torch.manual_seed(seed + ol)  # dropout in the inner loop
            learner_opt = torch.optim.AdamW(learner.model.parameters(), lr=cfg.learner_lr)
            for inner in range(cfg.inner_loop):
                start = time.perf_counter()
                real = [train.select(np.concatenate([real_batches[y].next() for _ in range(cfg.gm_real_accum)])) for y in range(num_labels)]
                syn = TextSet.concat([pool.select(syn_batches[y].pop()) for y in range(num_labels)])
                metrics = matching_step(gen, learner, real, syn, cfg, train, lm_batches, runtime)
                sync.finish()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(metrics)
                seconds["seconds_match"] += time.perf_counter() - start
                if inner + 1 < cfg.inner_loop:
                    start = time.perf_counter()
                    advance_learner(learner, learner_opt, train, learner_batches, cfg.learner_steps, runtime)
                    seconds["seconds_inner_loop"] += time.perf_counter() - start
            previous, state.step = state.step, (ol + 1) * cfg.inner_loop
            state.rng = rng.bit_generator.state
            summary: dict[str, float] = {}
            if crossed(previous, state.step, cfg.log_every) or ol + 1 == outer_loops:
                # reduced over workers at log steps only: one all-reduce, one transfer to the host
                summary = runtime.mean_metrics({**_average(history), **seconds, "lr": scheduler.get_last_lr()[0]})
                logger.log(summary, state.step)
                history = []
                bar.set_postfix(grad_sim=f"{summary.get('grad_sim', float('nan')):.3f}")
            if on_outer_loop is not None:
                state.capture_optim(optimizer, scheduler)
                on_outer_loop(state, summary)
    return state


def _synthetic_pool(gen, learner, cfg: DistillConfig, gen_cfg: GeneratorConfig, torch_rng, seed: int, label_filter: LabelFilter | None = None):
    """Generate ``gm_syn_dpc x inner_loop x generate_interval`` samples per label and batch them
    by ``pool_batches`` (after the label filter, when given). Returns (pool, batches, malformed
    samples dropped, samples decoded under the task's format, fraction of rows the filter judged
    consistent; 1.0 without a filter)."""
    per_label = cfg.gm_syn_dpc * cfg.inner_loop * cfg.generate_interval
    pool, dropped, constrained = gen.generate_all(per_label, gen_cfg, torch_rng)
    emb = learner.embed(pool)
    labels = torch.as_tensor(pool.labels)
    proba = label_filter(emb) if label_filter is not None else None
    batches = pool_batches(emb, labels, gen.task.num_labels, cfg.gm_syn_dpc, cfg.inner_loop * cfg.generate_interval, seed, proba)
    consistent = 1.0 if proba is None else float(consistent_mask(labels, proba).float().mean())
    return pool, batches, dropped, constrained, consistent


def matching_step(
    gen: Generator, learner: Learner, real: list[TextSet], syn: TextSet, cfg: DistillConfig, train: TextSet, lm_batches: Cycle, runtime: Runtime = Runtime()
) -> dict[str, torch.Tensor]:
    """One generator step's gradients (DiLM Alg. 1): backpropagate (1 - ``cfg.lm_lambda``) x the
    matching loss (+ ``cfg.lm_lambda`` x the LM loss on a ``train`` batch from ``lm_batches``)
    into the generator; the caller steps and zeroes its optimizer.

    ``real``: per label, the real batch (``gm_real_dpc x gm_real_accum`` rows) whose learner
    gradient is the target; ``syn``: the synthetic batch, every label, whose per-sample learner
    gradients are weighted by softmax(-generator LM loss / ``cfg.temperature``) per label. The
    learner gradient is of its head or of all its parameters (``cfg.grad``).

    Returns the step's ``match_loss`` (1 - mean per-label cosine similarity, in [0, 2]),
    ``grad_sim`` (in [-1, 1]), ``syn_lm_loss`` (and ``lm_loss``; nats/token) as detached 0-dim
    tensors on the generator's device.

    Forward passes (learner features, generator LM losses) run under ``runtime.autocast()``;
    per-sample gradients, sample weights and the matching loss are computed in fp32 outside it.
    """
    num_labels = len(real)
    with runtime.autocast():
        per_real = [learner_grads(learner, r, cfg.grad) for r in real]
        gen_losses = gen.lm_losses(syn)
        rows = [torch.as_tensor(syn.indices_of(label)) for label in range(num_labels)]
        per_syn = [learner_grads(learner, syn.select(r.numpy()), cfg.grad) for r in rows]
        lm = gen.lm_losses(train.select(lm_batches.next())).mean() if cfg.lm_lambda > 0 else None
    g_real = torch.stack([weighted_grad(g) for g in per_real])
    g_syn = []
    for r, grads in zip(rows, per_syn):
        weights = sample_weights(gen_losses[r], cfg.temperature)
        g_syn.append(weighted_grad(grads.to(weights.device), weights))
    loss, sims = match_loss(g_real.to(gen_losses.device), torch.stack(g_syn))
    total = (1.0 - cfg.lm_lambda) * loss
    # 0-dim tensors, turned into numbers at log steps only (an .item() per step stalls a GPU)
    metrics = {"match_loss": loss.detach(), "grad_sim": sims.mean().detach(), "syn_lm_loss": gen_losses.mean().detach()}
    if lm is not None:
        total = total + cfg.lm_lambda * lm
        metrics["lm_loss"] = lm.detach()
    total.backward()
    return metrics


def advance_learner(
    learner: Learner, optimizer: torch.optim.Optimizer, train: TextSet, batches: Cycle, steps: int, runtime: Runtime = Runtime()
) -> None:
    """Stage 2's inner loop between matching steps: ``steps`` updates of the learner (in train
    mode, left so) on batches of ``train`` rows drawn from ``batches``, their labels as targets
    (DiLM Alg. 1).

    ``optimizer``: over ``learner.model``'s parameters (stage 2 makes a fresh AdamW per outer
    loop). Forward under ``runtime.autocast()``; the cross-entropy (nats) and the update in fp32.
    Not ``evaluation.train_eval.train_learner``, which trains a learner on a distilled set.
    """
    model = learner.model
    model.train()
    for _ in range(steps):
        batch = train.select(batches.next())
        with runtime.autocast():
            logits = model(**learner.batch(batch)).float()
        loss = F.cross_entropy(logits, torch.as_tensor(batch.labels, device=logits.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _average(rows: list[dict[str, float | torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per key, the float64 mean over the rows that have it (0-dim tensors, on their device)."""
    keys = {k for r in rows for k in r}
    return {k: torch.stack([torch.as_tensor(r[k], dtype=torch.float64) for r in rows if k in r]).mean() for k in sorted(keys)}
