"""Can a learner's frozen features use a small set at all? Prints measured numbers.

For each pooling rule, logistic regression is fitted on the learner's frozen pooled features of
each given set and scored on real train rows outside the config's train subset (never the
validation split), so a learner setting can be chosen here without looking at the numbers the
benchmark reports. A learner that fine-tunes to chance on every method (as SmolLM2-135M does under
the evaluation protocol) can still show here whether its features carry the label.

    python benchmarks/learner_probe.py configs/bench/sst2.yaml --learner smollm2-135m \\
        --set runs/sst2-bench/distilled/random/dpc10/set0/train.parquet \\
        --set runs/sst2-bench/distilled/dilm/dpc10/set0/train.parquet

``--body-fraction 0.5`` probes the features of the body's first half instead (repeatable), the
learner's ``evaluate.body_fraction``.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from dilm_ray.config import load_config
from dilm_ray.data import TextSet
from dilm_ray.errors import UserError


def held_out_rows(full: TextSet, used: TextSet, n: int, seed: int) -> TextSet:
    """``n`` rows of ``full`` whose text is not in ``used`` (the rows distillation saw)."""
    seen = set(used.texts)
    order = np.random.default_rng(seed).permutation(len(full))
    picked = [i for i in order if full.texts[i] not in seen][:n]
    if len(picked) < n:
        raise UserError(f"only {len(picked)} train rows lie outside data.max_train_samples; lower --held-out")
    return full.select(np.array(picked))


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--learner", "learner_name", required=True, help="a platform learner (e.g. smollm2-135m, minilm-l6)")
@click.option("--set", "set_paths", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False), help="a dataset file to fit on (repeatable)")
@click.option("--pooling", "poolings", multiple=True, default=("last", "mean"), show_default=True, type=click.Choice(["last", "mean", "cls"]))
@click.option("--held-out", type=int, default=872, show_default=True, help="real train rows to score on")
@click.option("--body-fraction", "fractions", multiple=True, type=click.FloatRange(0.0, 1.0, min_open=True), help="probe the first f of the body's blocks (repeatable; default: the whole body)")
def main(config: str, overrides: tuple[str, ...], learner_name: str, set_paths: tuple[str, ...], poolings: tuple[str, ...], held_out: int, fractions: tuple[float, ...]) -> None:
    from sklearn.linear_model import LogisticRegression

    from dilm_ray.data import load_file, load_split
    from dilm_ray.evaluation.learners import build
    from dilm_ray.data import load_data
    from dilm_ray.seeding import setup_torch

    try:
        cfg = load_config(config, list(overrides))
        setup_torch(cfg)
        data = load_data(cfg, need_validation=False)
        held = held_out_rows(load_split(cfg.data, data.task, cfg.data.train_split), data.train, held_out, cfg.seed)
        sets = {path: load_file(Path(path), data.task) for path in set_paths}
        click.echo(f"| body fraction | pooling | set | rows | held-out accuracy % ({held_out} real train rows) |\n|---|---|---|---|---|")
        for fraction in fractions or (None,):
            probed = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"body_fraction": fraction})})
            learner = build(learner_name, probed, data.task, cfg.seed)
            if learner is None:
                raise UserError(f"{learner_name} has no features to probe")
            for pooling in poolings:
                learner.model.pooling = pooling  # the rule is read at each forward: one model for all rules
                features = learner.embed(held).numpy()
                for path, train in sets.items():
                    clf = LogisticRegression(max_iter=5000).fit(learner.embed(train).numpy(), train.labels)
                    click.echo(f"| {fraction or 1.0} | {pooling} | {path} | {len(train)} | {100 * clf.score(features, held.labels):.1f} |")
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
