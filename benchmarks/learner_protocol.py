"""Choose a learner family's evaluation protocol on held-out train rows. Prints measured numbers.

Each candidate is a list of dotted overrides (``evaluate.decoder.lr=1e-3
evaluate.decoder.train_top_layers=2``); every candidate trains the learner on the same random
real sets (``--sets`` balanced sets of ``--dpc`` rows per label drawn from the config's train
rows, one learner seed each) through the evaluator's own code (``evaluate_learner``, with the
family protocol it resolves) and scores it on ``data.dev_samples`` held-out train rows, never on
the validation split. The majority class of those rows is the floor to beat.

    python benchmarks/learner_protocol.py configs/bench/sst2.yaml --learner smollm2-135m --dpc 20 \\
        --candidate "evaluate.decoder.train_top_layers=null evaluate.decoder.pooling=last" \\
        --candidate "evaluate.decoder.lr=1e-3 evaluate.decoder.train_top_layers=0" --out runs/protocol-smollm2.csv

Rows go to ``--out`` as they finish; a rerun with the same file skips the (candidate, set) pairs
it holds, so an interrupted search continues.
"""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import click
import numpy as np

from dilm_ray.config import load_config
from dilm_ray.errors import UserError

FIELDS = ("learner", "candidate", "dpc", "set_index", "seed", "accuracy", "score", "seconds", "lr", "steps", "train_top_layers", "pooling")


def random_sets(train, dpc: int, n_sets: int, seed: int, num_labels: int) -> list:
    """``n_sets`` balanced random real sets of ``dpc`` rows per label; set i drawn with ``seed + i``."""
    from dilm_ray.data import subsample

    return [subsample(train, dpc * num_labels, seed + i, True, num_labels) for i in range(n_sets)]


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--learner", "learner_name", required=True, help="a platform learner (smollm2-135m, minilm-l6, scratch-transformer, ...)")
@click.option("--candidate", "candidates", multiple=True, required=True, help="space-separated dotted overrides of one protocol (repeatable)")
@click.option("--dpc", type=int, default=20, show_default=True, help="real rows per label in each set")
@click.option("--sets", "n_sets", type=int, default=3, show_default=True, help="random sets per candidate (one learner seed each)")
@click.option("--dev", "dev_samples", type=int, default=872, show_default=True, help="held-out train rows to score on (data.dev_samples)")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="CSV of the runs; resumed when it exists")
def main(config: str, overrides: tuple[str, ...], learner_name: str, candidates: tuple[str, ...], dpc: int, n_sets: int, dev_samples: int, out: str | None) -> None:
    from tqdm.auto import tqdm

    from dilm_ray.data import load_data
    from dilm_ray.evaluation.learners import evaluate_learner, family_config
    from dilm_ray.seeding import setup_torch

    try:
        base = [*overrides, f"data.dev_samples={dev_samples}"]
        cfgs = {c: load_config(config, [*base, *shlex.split(c)]) for c in candidates}
        first = next(iter(cfgs.values()))
        setup_torch(first)
        data = load_data(first)
        sets = random_sets(data.train, dpc, n_sets, first.seed, data.task.num_labels)
        majority = np.bincount(data.validation.labels).max() / len(data.validation)
        path = Path(out) if out else None
        done: list[dict] = list(csv.DictReader(path.open())) if path and path.is_file() else []
        have = {(r["learner"], r["candidate"], int(r["dpc"]), int(r["set_index"])) for r in done}
        todo = [(c, i) for c in candidates for i in range(n_sets) if (learner_name, c, dpc, i) not in have]
        click.echo(f"{learner_name}: {len(todo)} runs to do, {len(candidates) * n_sets - len(todo)} done earlier; "
                   f"{len(data.validation)} held-out train rows, majority class {100 * majority:.1f}%")
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        for candidate, i in tqdm(todo, desc="protocol runs"):
            cfg = cfgs[candidate]
            seed = cfg.seed + i
            # a fresh model per run: candidates differ in which layers train and their dtype
            result = evaluate_learner(learner_name, sets[i], data.validation, cfg, data.task, seed)
            resolved = family_config(cfg, learner_name)
            row = {"learner": learner_name, "candidate": candidate, "dpc": dpc, "set_index": i, "seed": seed, **{k: result[k] for k in ("accuracy", "score", "seconds")},
                   "lr": resolved.evaluate.lr, "steps": resolved.evaluate.steps, "train_top_layers": resolved.evaluate.train_top_layers, "pooling": resolved.learner.pooling}
            done.append({k: str(v) for k, v in row.items()})
            tqdm.write(f"{candidate or '(config)'} set {i}: {100 * result['score']:.1f}% in {result['seconds']:.0f} s")
            if path:
                with path.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=FIELDS)
                    writer.writeheader()
                    writer.writerows(done)
        click.echo(f"\n| candidate | lr | steps | trained blocks | pooling | score % (mean ± std) | runs | s per run |\n|---|---|---|---|---|---|---|---|")
        for candidate in candidates:
            rows = [r for r in done if r["learner"] == learner_name and r["candidate"] == candidate and int(r["dpc"]) == dpc]
            if not rows:
                continue
            acc = 100 * np.array([float(r["score"]) for r in rows])
            top = rows[0]["train_top_layers"]
            click.echo(f"| `{candidate or '(config)'}` | {rows[0]['lr']} | {rows[0]['steps']} | {'all' if top in ('', 'None') else top} | {rows[0]['pooling']} | "
                       f"{acc.mean():.1f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.1f} | {len(rows)} | {np.mean([float(r['seconds']) for r in rows]):.0f} |")
        click.echo(f"\nmajority class of the held-out rows: {100 * majority:.1f}%")
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
