"""DiLM against the coresets on real GLUE data, at a scale picked by ``--budget``.

A thin layer over the package's resumable pipeline (``dilm_ray.pipeline``): the same
stage table and evaluation as ``dilm-ray run --resume``, plus budgets, learner and seed
selections, and ``--record``. It writes ``<run_dir>/bench-<budget>[-dpc<D>]/``: ``runs.csv``
(one row per evaluation run), ``table.csv``/``table.md`` (mean, std, runs, Welch p-values vs
K-centers and random), ``accuracy_vs_dpc.png``, ``commands.txt``, ``provenance.jsonl`` (command,
commit and resolved config of each invocation), and ``timing.json`` beside it. Invocations with
other learners or methods at the same DPC add to one folder; its tables cover all its runs.

It always resumes: finished stages are skipped, stages 1-2 continue from their latest Ray
checkpoint, and evaluation runs already in ``runs.csv`` (same set, same protocol) are kept.

``--record DIR`` keeps that folder in ``DIR/<name>`` instead, with every set its runs used:
generated sets as ``train.jsonl``, coresets as ``rows.jsonl`` (their rows' indices in the
train split: real data is not copied into the record) plus the SHA-256 of each coreset file in
``coresets.json``. A fresh clone restores the sets from the record, so nothing is trained or
selected again for sets that are recorded; a rebuilt coreset that differs from its digest stops
the benchmark. The ``smoke`` budget runs under ``<name>-smoke``, never reusing real generators.

    python benchmarks/glue.py configs/bench/sst2.yaml --budget cpu --record benchmarks/results
    python benchmarks/glue.py configs/bench/sst2.yaml --budget cpu --record benchmarks/results --dpc 10 --method dilm --method k_centers --learner all --seeds smollm2-135m=1
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

from dilm_ray import interrupts
from dilm_ray.config import Config, load_config
from dilm_ray.errors import UserError
from dilm_ray.families import LEARNER_KINDS
from dilm_ray.layout import ROWS_FILE, RunLayout, discover_sets
from dilm_ray.methods import GENERATED, METHODS

# Scale of the distilled-set evaluation (and, for smoke, of the stages): sets per cell x seeds per set.
BUDGETS = {
    "smoke": ["pretrain.steps=4", "distill.steps=2", "distill.inner_loop=2", "synthesize.dpc=[5]", "synthesize.n_datasets=2",
              "evaluate.n_evals_per_dataset=1", "evaluate.steps=20"],
    "cpu": ["synthesize.n_datasets=10", "evaluate.n_evals_per_dataset=3"],
    "paper": ["synthesize.n_datasets=20", "evaluate.n_evals_per_dataset=5"],
}
ALL_LEARNERS = tuple(LEARNER_KINDS)  # every built-in learner (families.FAMILIES)
BASELINES = ("k_centers", "random")  # the table's Welch p-values are against these


def parse_seeds(specs: tuple[str, ...], learners: list[str]) -> dict[str, int]:
    """``("smollm2-135m=1",) -> {"smollm2-135m": 1}``: seeds per distilled set for single learners."""
    seeds = {}
    for spec in specs:
        name, _, raw = spec.partition("=")
        if not raw.isdigit() or int(raw) < 1:
            raise UserError(f"--seeds {spec}: expected LEARNER=N with N >= 1, e.g. smollm2-135m=1")
        if name not in learners:
            raise UserError(f"--seeds {spec}: learner '{name}' is not evaluated (learners: {', '.join(learners)})")
        seeds[name] = int(raw)
    return seeds


# ---- the record -------------------------------------------------------------------------------


def restore_record(record: Path, run_dir: Path, train) -> int:
    """Put the record's sets into the run folder where it lacks them: generated sets are
    copied, coresets rebuilt from ``rows.jsonl`` on the loaded train rows and checked against
    ``coresets.json``. Returns the number of sets restored."""
    digests = _coreset_digests(record)
    restored = 0
    for paths in discover_sets(RunLayout(record).distilled).values():
        for path in paths:
            target = run_dir / path.relative_to(record)
            if target.parent.joinpath("train.jsonl").is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target.parent / "train.jsonl")
            restored += 1
    for rows_file in sorted(RunLayout(record).distilled.glob(f"*/dpc*/set*/{ROWS_FILE}")):
        folder = run_dir / rows_file.parent.relative_to(record)
        if (folder / "train.jsonl").is_file():
            continue
        rows = [json.loads(line)["row"] for line in rows_file.read_text().splitlines() if line.strip()]
        if max(rows, default=-1) >= len(train):
            raise UserError(f"{rows_file}: row {max(rows)} is outside the {len(train)} train rows of this config")
        train.select(rows).save(folder)
        shutil.copy2(rows_file, folder / ROWS_FILE)
        _check_digest(run_dir, folder / "train.jsonl", digests, record)
        restored += 1
    return restored


def save_record(run_dir: Path, record: Path, methods: list[str]) -> None:
    """Keep the run folder's sets of ``methods`` in the record: generated sets' ``train.jsonl``
    (and ``preview.md``), coresets' ``rows.jsonl`` and their digests in ``coresets.json``."""
    digests = _coreset_digests(record)
    for method in methods:
        source = RunLayout(run_dir).method_dir(method)
        if method in GENERATED:
            for path in [*sorted(source.glob("dpc*/set*/train.jsonl")), source / "preview.md"]:
                target = record / path.relative_to(run_dir)
                if path.is_file() and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        else:
            for path in sorted(source.glob("dpc*/set*/train.jsonl")):
                _check_digest(run_dir, path, digests, record)
                rows = path.parent / ROWS_FILE
                target = record / rows.relative_to(run_dir)
                if rows.is_file() and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(rows, target)
    (record / "coresets.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def _coreset_digests(record: Path) -> dict[str, str]:
    path = record / "coresets.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_digest(run_dir: Path, path: Path, digests: dict[str, str], record: Path) -> None:
    """Add the coreset's digest to ``digests``; a different recorded digest is an error, since
    the recorded runs were trained on the recorded set."""
    from dilm_ray.keys import file_digest

    name, digest = str(path.relative_to(run_dir)), file_digest(path)
    if digests.get(name, digest) != digest:
        raise UserError(
            f"{path} differs from the set recorded in {record / 'coresets.json'}: its recorded runs were trained "
            "on another set; remove those runs and the digest from the record to redo them"
        )
    digests[name] = digest


def record_command(out: Path, command: str) -> list[str]:
    """Add ``command`` to the folder's ``commands.txt`` (once) and return all of them, oldest first."""
    path = out / "commands.txt"
    commands = path.read_text().splitlines() if path.exists() else []
    if command not in commands:
        commands.append(command)
        path.write_text("\n".join(commands) + "\n")
    return commands


def record_provenance(out: Path, command: str, commit: str, cfg: Config, added_runs: int) -> None:
    """Append the invocation (command, commit at its start, resolved config, runs it added) to ``provenance.jsonl``."""
    line = {"command": command, "commit": commit, "added_runs": added_runs, "config": cfg.to_dict()}
    with open(out / "provenance.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def markdown(table_md: str, timer, commands: list[str]) -> str:
    return "\n".join(["Produced by", "", "```bash", *commands, "```", "", table_md, "", timer.markdown()]) + "\n"


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--budget", type=click.Choice(sorted(BUDGETS)), default="cpu", show_default=True)
@click.option("--method", "methods", multiple=True, type=click.Choice(list(METHODS)), default=tuple(m for m, spec in METHODS.items() if spec.paper), show_default=True)
@click.option("--dpc", "dpcs", multiple=True, type=int, help="evaluate these DPC only (default: synthesize.dpc)")
@click.option("--learner", "learners", multiple=True, help="learner(s) to evaluate; 'all' for every platform learner")
@click.option("--seeds", "seed_specs", multiple=True, metavar="LEARNER=N", help="seeds per set for one learner (default: evaluate.n_evals_per_dataset)")
@click.option("--record", type=click.Path(file_okay=False, path_type=Path), help="keep runs, tables, timing and sets in DIR/<name>, and resume from them")
def main(config: str, overrides: tuple[str, ...], budget: str, methods, dpcs, learners, seed_specs, record: Path | None) -> None:
    from dilm_ray.data import load_data
    from dilm_ray.pipeline.base import Context, check_inputs
    from dilm_ray.pipeline.evaluate import EVALUATION_RUNS, evaluate_and_report
    from dilm_ray.pipeline.table import run_stages
    from dilm_ray.provenance import commit
    from dilm_ray.seeding import setup_torch
    from dilm_ray.timing import StageTimer
    from dilm_ray.tracking.mlflow_store import log_artifacts, mlflow_run

    interrupts.install()
    code = commit()  # the code this invocation runs, before anything it writes
    try:
        cfg = load_config(config, [*BUDGETS[budget], *overrides])
        if budget == "smoke":
            cfg = cfg.model_copy(update={"name": f"{cfg.name}-smoke"})
        learner_list = list(ALL_LEARNERS) if "all" in learners else (list(learners) or [cfg.learner.model])
        seeds = parse_seeds(seed_specs, learner_list)
        setup_torch(cfg)
        check_inputs(cfg)
        data = load_data(cfg)
        # runs.csv is keyed by learner, so every learner selection at these DPC shares one folder
        tag = "-".join(["bench", budget, *([f"dpc{'_'.join(map(str, dpcs))}"] if dpcs else [])])
        layout = RunLayout(cfg.run_dir)
        root = record / cfg.name if record else cfg.run_dir
        out = root / tag
        out.mkdir(parents=True, exist_ok=True)
        timer = StageTimer(root / "timing.json")
        ran_before = timer.runs.get(EVALUATION_RUNS, 0)
        with mlflow_run(cfg, tag, layout.mlflow_runs, resume=True) as run_id:
            if record:
                click.echo(f"[record] {restore_record(root, cfg.run_dir, data.train)} sets restored from {root}")
            ctx = Context(cfg, data, tuple(methods), run_id, resume=True)
            run_stages(ctx, timer)
            if record:
                save_record(cfg.run_dir, root, list(methods))
            report = evaluate_and_report(ctx, timer, out, learner_list, seeds, list(dpcs) or None, BASELINES, f"evaluate ({tag})")
            options = [f"--budget {budget}", *([f"--record {record}"] if record else []), *(f"--dpc {d}" for d in dpcs), *(f"--method {m}" for m in methods), *(f"--learner {x}" for x in learners), *(f"--seeds {x}" for x in seed_specs)]
            command = " ".join(["python benchmarks/glue.py", config, *overrides, *options])
            added = timer.runs.get(EVALUATION_RUNS, 0) - ran_before
            if added:
                record_provenance(out, command, code, cfg, added)
            (out / "table.md").write_text(markdown(report.markdown, timer, record_command(out, command)))
            paths = [*report.paths, out / "commands.txt", out / "provenance.jsonl", timer.path]
            log_artifacts(run_id, paths, tag)
            if run_id is not None:
                import mlflow

                mlflow.log_metrics({f"{r.method}.dpc{r.dpc}.{Path(r.learner).name}.mean": r.mean for r in report.table.itertuples()})
                mlflow.log_metrics({f"seconds.{k.split(' ')[0]}": v for k, v in timer.seconds.items()})
        click.echo((out / "table.md").read_text())
        click.echo(f"evaluation runs this invocation: {added}")
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as err:
        click.echo(f"interrupted ({err}): finished stages and evaluation runs are kept; run the same command to continue", err=True)
        sys.exit(interrupts.exit_code(err))


if __name__ == "__main__":
    main()
