"""DiLM against the coresets on real GLUE data, at a scale picked by ``--budget``.

Runs stage 1 and 2 (Ray Train), synthesis (DiLM and LM-only), the coresets (random, K-centers,
herding) and the paper's evaluation protocol, then writes under ``<run_dir>/bench/``:
``runs.csv`` (one row per training run), ``table.csv``/``table.md`` (mean, std, runs, Welch
p-values vs K-centers and random), ``timing.json`` (wall time per stage) and an MLflow run.
Invocations with other learners or methods at the same DPC add to one folder: its tables cover
every run in its ``runs.csv`` and ``commands.txt`` lists the commands that made them.

It resumes: a stage whose outputs exist is skipped, stage 1-2 continue from their latest Ray
checkpoint, and evaluation runs already in ``runs.csv`` are not repeated. Rerun the same
command after an interruption.

``--record DIR`` keeps the small outputs in ``DIR/<name>`` instead (``runs.csv``, tables,
timing, a copy of the generated sets and the coresets' digests), e.g. under version control: a
fresh machine then resumes from the record without re-training the generators whose sets are
all recorded, and stops if a recomputed coreset differs from the one its runs were trained on.
The ``smoke`` budget runs under ``<name>-smoke`` so that its tiny generators are never reused.

    python benchmarks/glue.py configs/bench/sst2.yaml --budget cpu --record benchmarks/results
    python benchmarks/glue.py configs/bench/sst2.yaml --budget cpu --record benchmarks/results --dpc 10 --method dilm --method k_centers --learner all --seeds smollm2-135m=1
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import click
import pandas as pd

from dilm_ray.config import Config, load_config
from dilm_ray.errors import UserError

# Scale of the distilled-set evaluation (and, for smoke, of the stages): sets per cell x seeds per set.
BUDGETS = {
    "smoke": ["pretrain.steps=4", "distill.steps=2", "distill.inner_loop=2", "synthesize.dpc=[5]", "synthesize.n_datasets=2",
              "evaluate.n_evals_per_dataset=1", "evaluate.steps=20"],
    "cpu": ["synthesize.n_datasets=10", "evaluate.n_evals_per_dataset=3"],
    "paper": ["synthesize.n_datasets=20", "evaluate.n_evals_per_dataset=5"],
}
ALL_LEARNERS = ("minilm-l6", "smollm2-135m", "scratch-transformer", "tfidf-logreg")
KEY = ["learner", "method", "dpc", "set_index", "seed"]
BASELINES = ("k_centers", "random")  # the table's Welch p-values are against these
GENERATED = ("dilm", "lm_only")  # methods whose sets need the generators (hours to remake)
CORESETS = ("random", "k_centers", "herding")  # real rows: recomputed, only their digests recorded


class Stages:
    """Wall time per stage, summed over resumed invocations and kept in ``timing.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, done: bool, fn) -> None:
        if done:
            click.echo(f"[{name}] done earlier ({self.seconds.get(name, 0.0):.0f} s), skipped")
            return
        click.echo(f"[{name}] ...")
        start = time.perf_counter()
        fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.path.write_text(json.dumps(self.seconds, indent=1))


def _sets_exist(cfg: Config, methods: list[str]) -> bool:
    from dilm_ray.pipeline import set_dir

    return all(
        (set_dir(cfg, m, dpc, i) / "train.parquet").is_file()
        for m in methods
        for dpc in cfg.synthesize.dpc
        for i in range(1 if m == "herding" else cfg.synthesize.n_datasets)
    )


def run_stages(cfg: Config, stages: Stages, data, methods: list[str]) -> None:
    """Make the sets of ``methods`` that are missing; a generator is trained only if one of those needs it."""
    from dilm_ray.pipeline import coreset_stage, synthesize_stage
    from dilm_ray.train.ray_train import fit_stage

    lm, dilm = (cfg.run_dir / d / "config.json" for d in ("generator-lm", "generator-dilm"))
    need_dilm = "dilm" in methods and not _sets_exist(cfg, ["dilm"])
    need_lm_only = "lm_only" in methods and not _sets_exist(cfg, ["lm_only"])
    need_lm = need_lm_only or (need_dilm and not dilm.is_file())
    coresets = [m for m in CORESETS if m in methods]
    stages.run("pretrain", lm.is_file() or not need_lm, lambda: fit_stage(cfg, "pretrain", resume=True))
    stages.run("distill", dilm.is_file() or not need_dilm, lambda: fit_stage(cfg, "distill", resume=True))
    if "dilm" in methods:
        stages.run("synthesize_dilm", not need_dilm, lambda: synthesize_stage(cfg, data, "dilm", resume=True))
    if "lm_only" in methods:
        stages.run("synthesize_lm_only", not need_lm_only, lambda: synthesize_stage(cfg, data, "lm_only", resume=True))
    if coresets:
        stages.run("coreset", _sets_exist(cfg, coresets), lambda: coreset_stage(cfg, data, tuple(coresets)))


def copy_missing(src: Path, dst: Path) -> None:
    """Copy the generated sets under ``src/distilled`` to ``dst/distilled`` where ``dst`` lacks them."""
    for path in sorted(p for m in GENERATED for p in (src / "distilled" / m).rglob("*") if p.is_file()):
        target = dst / path.relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def check_coresets(run_dir: Path, record: Path) -> None:
    """Record each coreset's SHA-256 in ``record/coresets.json``; a recomputed coreset that differs
    from its recorded digest is an error, because its recorded runs were trained on the old one."""
    path = record / "coresets.json"
    digests = {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for m in CORESETS
        for p in sorted((run_dir / "distilled" / m).glob("dpc*/set*/train.jsonl"))
    }
    recorded = json.loads(path.read_text()) if path.exists() else {}
    changed = sorted(k for k in digests.keys() & recorded.keys() if digests[k] != recorded[k])
    if changed:
        raise UserError(
            f"{run_dir / changed[0]} differs from the set recorded in {path} ({len(changed)} sets differ): "
            "its recorded runs were trained on another set; remove those runs and digests from the record to redo them"
        )
    path.write_text(json.dumps({**recorded, **digests}, indent=1, sort_keys=True) + "\n")


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


def bench_plan(groups: dict, learners: list[str], n_sets: int, default_seeds: int, seeds: dict[str, int], seed: int) -> list:
    """Every learner's runs; one with fewer seeds per set gets a prefix of the full plan's runs."""
    from dilm_ray.evaluation.runner import run_plan

    return [run for name in learners for run in run_plan(groups, n_sets * seeds.get(name, default_seeds), seed, [name])]


def run_key(run) -> tuple[str, ...]:
    """A run's identity in ``runs.csv`` (values as text: the CSV reads them back as numbers)."""
    return tuple(str(getattr(run, k)) for k in KEY)


def row_key(row: dict) -> tuple[str, ...]:
    """``run_key`` of a ``runs.csv`` row."""
    return tuple(str(row[k]) for k in KEY)


def evaluate_remaining(cfg: Config, data, methods: list[str], dpcs: list[int], learners: list[str], seeds: dict[str, int], out: Path) -> pd.DataFrame:
    """Run the plan's runs that ``runs.csv`` does not hold yet, saving each one as it finishes;
    return every run ``runs.csv`` holds, this plan's and earlier invocations'."""
    from dilm_ray.data import load_file
    from dilm_ray.evaluation.runner import evaluate_plan
    from dilm_ray.pipeline import discover_sets

    found = discover_sets(cfg.run_dir / "distilled")
    groups = {}
    for (method, dpc), paths in found.items():
        if method in methods and dpc in dpcs:
            groups[(method, dpc)] = [load_file(p, data.task) for p in paths[: cfg.synthesize.n_datasets]]
    missing = [(m, d) for m in methods for d in dpcs if (m, d) not in groups]
    if missing:
        raise UserError(f"no distilled sets for {missing} under {cfg.run_dir / 'distilled'}")
    plan = bench_plan(groups, learners, cfg.synthesize.n_datasets, cfg.evaluate.n_evals_per_dataset, seeds, cfg.seed)
    path = out / "runs.csv"
    earlier = pd.read_csv(path).to_dict("records") if path.exists() else []
    seen = {row_key(row) for row in earlier}
    todo = [r for r in plan if run_key(r) not in seen]
    click.echo(f"[evaluate] {len(plan) - len(todo)} of {len(plan)} runs done earlier")
    rows = list(earlier)

    def save(row: dict) -> None:
        rows.append(row)
        pd.DataFrame(rows).to_csv(path, index=False)

    if todo:
        evaluate_plan(cfg, data.task, data.validation, groups, todo, on_row=save)
    return pd.DataFrame(rows)


def record_command(out: Path, command: str) -> list[str]:
    """Add ``command`` to the folder's ``commands.txt`` (once) and return all of them, oldest first."""
    path = out / "commands.txt"
    commands = path.read_text().splitlines() if path.exists() else []
    if command not in commands:
        commands.append(command)
        path.write_text("\n".join(commands) + "\n")
    return commands


def markdown(table: pd.DataFrame, seconds: dict[str, float], commands: list[str], score_name: str) -> str:
    from dilm_ray.evaluation.runner import to_markdown

    lines = ["Produced by", "", "```bash", *commands, "```", "", to_markdown(table, score_name), "", "| stage | wall time (min) |", "|---|---|"]
    lines += [f"| {name} | {sec / 60:.1f} |" for name, sec in seconds.items()]
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--budget", type=click.Choice(sorted(BUDGETS)), default="cpu", show_default=True)
@click.option("--method", "methods", multiple=True, default=("dilm", "lm_only", "random", "k_centers", "herding"), show_default=True)
@click.option("--dpc", "dpcs", multiple=True, type=int, help="evaluate these DPC only (default: synthesize.dpc)")
@click.option("--learner", "learners", multiple=True, help="learner(s) to evaluate; 'all' for every platform learner")
@click.option("--seeds", "seed_specs", multiple=True, metavar="LEARNER=N", help="seeds per set for one learner (default: evaluate.n_evals_per_dataset)")
@click.option("--record", type=click.Path(file_okay=False, path_type=Path), help="keep runs, tables, timing and generated sets in DIR/<name>, and resume from them")
def main(config: str, overrides: tuple[str, ...], budget: str, methods, dpcs, learners, seed_specs, record: Path | None) -> None:
    import sys

    from dilm_ray.evaluation.plots import accuracy_vs_dpc
    from dilm_ray.evaluation.runner import results_table
    from dilm_ray.pipeline import check_inputs, load_data, setup_torch
    from dilm_ray.tracking.mlflow_store import log_artifacts, mlflow_run

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
        root = record / cfg.name if record else cfg.run_dir
        out = root / tag
        out.mkdir(parents=True, exist_ok=True)
        stages = Stages(root / "timing.json")
        with mlflow_run(cfg, tag) as run_id:
            if record:
                copy_missing(root, cfg.run_dir)
            run_stages(cfg, stages, data, list(methods))
            if record:
                copy_missing(cfg.run_dir, root)
                check_coresets(cfg.run_dir, root)
            start = time.perf_counter()
            runs = evaluate_remaining(cfg, data, list(methods), list(dpcs) or cfg.synthesize.dpc, learner_list, seeds, out)
            stages.seconds[f"evaluate ({tag})"] = stages.seconds.get(f"evaluate ({tag})", 0.0) + time.perf_counter() - start
            stages.path.write_text(json.dumps(stages.seconds, indent=1))
            table = results_table(runs, references=BASELINES)
            table.to_csv(out / "table.csv", index=False)
            options = [f"--budget {budget}", *([f"--record {record}"] if record else []), *(f"--dpc {d}" for d in dpcs), *(f"--method {m}" for m in methods), *(f"--learner {x}" for x in learners), *(f"--seeds {x}" for x in seed_specs)]
            command = " ".join(["python benchmarks/glue.py", config, *overrides, *options])
            (out / "table.md").write_text(markdown(table, stages.seconds, record_command(out, command), data.task.score_name))
            paths = [out / "runs.csv", out / "commands.txt", out / "table.csv", out / "table.md", accuracy_vs_dpc(table, out / "accuracy_vs_dpc.png", data.task.score_name), stages.path]
            log_artifacts(run_id, paths, tag)
            if run_id is not None:
                import mlflow

                mlflow.log_metrics({f"{r.method}.dpc{r.dpc}.{Path(r.learner).name}.mean": r.mean for r in table.itertuples()})
                mlflow.log_metrics({f"seconds.{k.split(' ')[0]}": v for k, v in stages.seconds.items()})
        click.echo((out / "table.md").read_text())
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
