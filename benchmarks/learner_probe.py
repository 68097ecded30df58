"""Can a learner's frozen features use a small set at all? Prints measured numbers.

For each pooling rule, logistic regression is fitted on the learner's frozen pooled features of
each given set and scored on ``--held-out`` real train rows outside the config's train subset
(the package's development split, ``data.dev_samples``; never the validation split), so a
learner setting can be chosen here without looking at the numbers the benchmark reports. It
tells a learner whose fine-tuning fails apart from one whose features do not carry the label:
SmolLM2-135M's first protocol (full fine-tune) collapsed to one class while its frozen features
carried some of the label, and its middle blocks more than its last (benchmarks/README.md,
"Learner probe" and "Learner protocols"), which led to its linear probe on the first half of
the body.

    python benchmarks/learner_probe.py configs/bench/sst2.yaml --learner smollm2-135m \\
        --set runs/sst2-bench/distilled/random/dpc10/set0/train.parquet \\
        --set runs/sst2-bench/distilled/dilm/dpc10/set0/train.parquet

``--body-fraction 0.5`` probes the features of the body's first half instead (repeatable), the
learner's ``evaluate.body_fraction``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from dilm_ray.config import Config, load_config
from dilm_ray.data import TaskData
from dilm_ray.errors import UserError


def load_probe_data(config: str | None, overrides: Sequence[str], held_out: int) -> tuple[Config, TaskData]:
    """The config (``data.dev_samples = held_out``) and its data: ``validation`` holds the
    ``held_out`` train-split rows outside the train subset that ``load_data`` carves for a
    development split, the same rows a benchmark with that setting reports on.

    Raises UserError as ``load_config`` and ``load_data`` do, e.g. when fewer train rows lie
    outside ``data.max_train_samples``."""
    from dilm_ray.data import load_data

    cfg = load_config(config, [*overrides, f"data.dev_samples={held_out}"])
    return cfg, load_data(cfg)


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--learner", "learner_name", required=True, help="a platform learner (e.g. smollm2-135m, minilm-l6)")
@click.option("--set", "set_paths", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False), help="a dataset file to fit on (repeatable)")
@click.option("--pooling", "poolings", multiple=True, default=("last", "mean"), show_default=True, type=click.Choice(["last", "mean", "cls"]))
@click.option("--held-out", type=click.IntRange(min=1), default=872, show_default=True, help="real train rows outside the train subset to score on (sets data.dev_samples)")
@click.option("--body-fraction", "fractions", multiple=True, type=click.FloatRange(0.0, 1.0, min_open=True), help="probe the first f of the body's blocks (repeatable; default: the whole body)")
def main(config: str, overrides: tuple[str, ...], learner_name: str, set_paths: tuple[str, ...], poolings: tuple[str, ...], held_out: int, fractions: tuple[float, ...]) -> None:
    from sklearn.linear_model import LogisticRegression

    from dilm_ray.data import load_file
    from dilm_ray.evaluation.learners import build
    from dilm_ray.seeding import setup_torch

    try:
        cfg, data = load_probe_data(config, overrides, held_out)
        setup_torch(cfg)
        held = data.validation  # with data.dev_samples: held-out train rows, not the validation split
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
