"""How well does the label filter's reference classifier label real rows? Prints measured numbers.

The label-consistency filter (``dilm_ray.algorithm.selection.embedding_classifier``, method
``dilm_filtered``) is logistic regression on the learner's frozen embeddings of the train rows.
This script fits it on the config's train rows for each ``--c`` and scores it on held-out
**train** rows (``data.dev_samples``: rows outside the train rows, never the validation split),
beside the TF-IDF classifier that measures label fidelity. The train embeddings come from the
run's cache when stage 2 or the coresets made them.

    python benchmarks/label_filter.py configs/bench/qqp.yaml --dev-samples 2000 --c 0.01 --c 0.1 --c 1
"""

from __future__ import annotations

import sys
import time

import click
import numpy as np

from dilm_ray.config import load_config
from dilm_ray.errors import UserError


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--dev-samples", type=int, default=2000, show_default=True, help="held-out train rows to score on")
@click.option("--c", "cs", type=float, multiple=True, default=(0.01, 0.1, 1.0), show_default=True, help="inverse L2 strength (repeatable)")
def main(config: str, overrides: tuple[str, ...], dev_samples: int, cs: tuple[float, ...]) -> None:
    from dilm_ray.algorithm.selection import embedding_classifier
    from dilm_ray.data import load_data
    from dilm_ray.evaluation.fidelity import reference_classifier
    from dilm_ray.layout import RunLayout
    from dilm_ray.models.learner import build_learner
    from dilm_ray.precision import autocast, prepare
    from dilm_ray.seeding import setup_torch
    from dilm_ray.train.embeddings import train_embeddings

    try:
        cfg = load_config(config, [*overrides, f"data.dev_samples={dev_samples}"])
        setup_torch(cfg)
        data = load_data(cfg)
        dev = data.validation
        learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
        train_x = train_embeddings(RunLayout(cfg.run_dir).cache, data.train, learner, cfg.precision)
        prepare(learner.model.body, cfg.precision, learner.device)
        with autocast(cfg.precision, learner.device):
            dev_x = learner.embed(dev, progress=True)
        majority = np.bincount(dev.labels).max() / len(dev)
        click.echo(f"{len(data.train)} train rows, {len(dev)} held-out train rows (majority class {100 * majority:.1f}%)")
        click.echo("| reference classifier | held-out accuracy % | per label % | fit seconds |\n|---|---|---|---|")
        candidates = [(f"logistic regression on {cfg.learner.model} embeddings, C={c:g}", lambda c=c: embedding_classifier(train_x, data.train.labels, cfg.seed, c), True) for c in cs]
        candidates.append(("TF-IDF + logistic regression (the fidelity reference)", lambda: reference_classifier(data.train, cfg.seed), False))
        for name, fit, on_embeddings in candidates:
            start = time.perf_counter()
            predict = fit()
            seconds = time.perf_counter() - start
            predicted = predict(dev_x).argmax(1).numpy() if on_embeddings else predict(dev)
            hits = predicted == dev.labels
            per = "/".join(f"{100 * hits[dev.labels == y].mean():.0f}" for y in range(data.task.num_labels))
            click.echo(f"| {name} | {100 * hits.mean():.1f} | {per} | {seconds:.1f} |")
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
