"""Does the generator write text of the label it is asked for? Prints measured numbers.

A reference classifier (word 1-2 gram TF-IDF + logistic regression, fitted on the config's real
train rows) labels generated samples; fidelity = the share it assigns to the requested label.
Its accuracy on the real validation split is printed beside it as the ceiling to read it against.

Two uses:

    # stage-1 generators trained N steps from the packaged model, one per label-token init
    python benchmarks/label_fidelity.py configs/bench/sst2.yaml --steps 40 --init bos --init label_name
    # generators already trained (stage 1 or 2 folders)
    python benchmarks/label_fidelity.py configs/bench/sst2.yaml --generator runs/sst2-bench/generator-lm
    # stage-1 generators trained N steps, one per set of dotted overrides ("" = the config's own)
    python benchmarks/label_fidelity.py configs/bench/qqp.yaml --steps 480 --train "" --train "generator.train_top_layers=null generator.lora_rank=16"

Generators trained here run in the config's precision (``precision``), in this process (no Ray),
and every row samples in it, as synthesis does (bf16: under autocast). Rows recorded before
2026-12-03 sampled in fp32.
"""

from __future__ import annotations

import time

import click
import numpy as np
import torch

from dilm_ray.config import Config, load_config
from dilm_ray.data import TextSet
from dilm_ray.errors import UserError
from dilm_ray.evaluation.fidelity import reference_classifier


def fidelity(cfg: Config, gen, predict, per_label: int) -> tuple[float, list[float], TextSet]:
    """(overall fidelity, per-label fidelity, the samples) for ``per_label`` samples per label."""
    samples, _, _ = gen.generate_all(per_label, cfg.generator, torch.Generator().manual_seed(cfg.seed), 10)
    hits = predict(samples) == samples.labels
    per = [float(hits[samples.labels == y].mean()) for y in range(gen.task.num_labels)]
    return float(hits.mean()), per, samples


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--generator", "generators", multiple=True, help="a trained generator folder to measure (repeatable)")
@click.option("--init", "inits", multiple=True, type=click.Choice(["label_name", "bos"]), help="train a stage-1 generator from the packaged model with this label-token init")
@click.option("--train", "trains", multiple=True, help="train a stage-1 generator from the config with these space-separated dotted overrides (repeatable; \"\" for none)")
@click.option("--steps", type=int, default=40, show_default=True, help="LM steps for --init and --train generators")
@click.option("--per-label", type=int, default=100, show_default=True)
def main(config: str, overrides: tuple[str, ...], generators, inits, trains, steps: int, per_label: int) -> None:
    import sys

    from dilm_ray.models.generator import build_generator
    from dilm_ray.data import load_data
    from dilm_ray.seeding import setup_torch
    from dilm_ray.precision import resolve
    from dilm_ray.train.pretrain import pretrain
    from dilm_ray.train.runtime import Runtime

    try:
        cfg = load_config(config, list(overrides))
        setup_torch(cfg)
        data = load_data(cfg)
        predict = reference_classifier(data.train)
        ceiling = float((predict(data.validation) == data.validation.labels).mean())
        click.echo(f"reference classifier: {100 * ceiling:.1f}% on {len(data.validation)} real validation rows")
        click.echo("| generator | LM steps | final LM loss | fidelity % | per label % | seconds |\n|---|---|---|---|---|---|")
        runtime = Runtime(precision=resolve(cfg.precision, cfg.ray.use_gpu))
        rows = [(g, None) for g in generators]
        rows += [(None, f"generator.label_init={i}") for i in inits] + [(None, t) for t in trains]
        for source, train_overrides in rows:
            start, loss = time.perf_counter(), float("nan")
            if train_overrides is None:
                gen, name, n = build_generator(cfg.generator, data.task, source), source, "-"
            else:
                run_cfg = load_config(config, [*overrides, *train_overrides.split()])
                setup_torch(run_cfg)
                gen_cfg = run_cfg.generator
                gen, name, n = build_generator(gen_cfg, data.task), f"{gen_cfg.model} {train_overrides}".strip(), steps
                pretrain_cfg = run_cfg.pretrain.model_copy(update={"steps": steps, "log_every": steps})
                losses = []
                pretrain(gen, data.train, pretrain_cfg, gen_cfg, run_cfg.seed, runtime, logger=_Collect(losses))
                loss = losses[-1]
            with runtime.autocast():  # a generator trained here in bf16 holds its frozen layers in bf16
                score, per, samples = fidelity(cfg, gen, predict, per_label)
            per_text = " / ".join(f"{name_}: {100 * p:.0f}" for name_, p in zip(data.task.label_names, per))
            click.echo(f"| {name} | {n} | {loss:.3f} | {100 * score:.1f} | {per_text} | {time.perf_counter() - start:.0f} |")
            for y, label in enumerate(data.task.label_names):
                click.echo(f"  e.g. {label}: " + " | ".join(t[0][:60] for t in samples.select(np.flatnonzero(samples.labels == y)[:4]).texts))
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


class _Collect:
    """A metric logger keeping the LM loss values."""

    def __init__(self, out: list[float]) -> None:
        self.out = out

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.out.append(metrics["lm_loss"])


if __name__ == "__main__":
    main()
