"""How DiLM's text scales with stage-1 compute: one generator, continued, evaluated at each point.

One stage-1 generator is trained on the config's data and profile and continued to each of
``--points`` LM steps (default 480, 960, 1,920, 3,840 steps of ``pretrain.batch_size``). Each
point is its own run folder (``<name>-scaling<N>``) whose stage 1 continues the previous
point's generator with its optimizer, scheduler and RNG states (``driver.ray_train.fit_stage``
``state=``), so point N *is* the longer run stopped at N steps. For that the LR schedule must
not depend on the total steps: every point runs ``pretrain.scheduler=constant`` after the
profile's own warm-up steps (``int(steps * warmup_ratio)`` of the profile: 24 for
``configs/bench/qqp.yaml``). So the 480-step point is not the bench record's 480-step generator,
whose LR decayed linearly to 0.

At each point: the LM-only label fidelity (``--per-label`` samples per label of the stage-1
generator, before any selection; the TF-IDF reference classifier of ``evaluation.fidelity``),
stage 2 (the profile's matching steps), synthesis of DiLM's sets and DiLM's with the label
filter at DPC ``--dpc``, their label fidelity, and their evaluation (``--sets`` sets x 1 learner
seed; ``--last-sets`` at the last point). K-centers and random are not run again: their runs
come from ``--baseline`` (a ``runs.csv`` of ``benchmarks/glue.py --record``), unchanged, and
the script refuses to compare when the baseline runs' evaluation key (learner, protocol,
validation rows, precision) is not the one its own runs get.

Everything resumes: finished points are read back; in a point, finished stages are skipped,
stages 1-2 continue from their latest Ray checkpoint and finished evaluation runs are kept. The
record (``--record``, default ``benchmarks/results/qqp-scaling/``) is rewritten after every
point: ``points.csv`` (one row per point), ``runs.csv`` (every evaluation run, with its
``steps``), ``point<N>/`` (the point's sets as ``train.jsonl``, its ``table.md`` and
``fingerprint.json``), ``scaling.png``, ``table.md`` (the table, the fit and the commands).

    setsid nohup python benchmarks/scaling.py run configs/bench/qqp.yaml > scaling.log 2>&1 &
    python benchmarks/scaling.py report      # table, fit and plot from the record alone
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import click
import numpy as np
import pandas as pd

from dilm_ray import interrupts
from dilm_ray.config import Config, load_config
from dilm_ray.errors import UserError

RECORD = Path(__file__).parent / "results" / "qqp-scaling"
BASELINE = Path(__file__).parent / "results" / "qqp-bench-bf16" / "bench-cpu-dpc10" / "runs.csv"
METHODS = ("dilm", "dilm_filtered")  # generated at every point
BASELINES = ("k_centers", "random")  # from the baseline record
POINT_FILE = "point.json"


# ---- pure pieces ---------------------------------------------------------------------------------


def warmup_steps(cfg: Config) -> int:
    """The profile's own warm-up in steps, as ``train.optim.schedule`` counts them."""
    return int(cfg.pretrain.steps * cfg.pretrain.warmup_ratio)


def point_overrides(name: str, steps: int, warmup: int, sets: int, dpc: int) -> list[str]:
    """Dotted overrides that make the profile the point at ``steps`` LM steps: a constant LR
    after ``warmup`` steps (the ratio rounds to exactly ``warmup`` at any ``steps``), ``sets``
    sets of DPC ``dpc``, one learner seed per set, no full-data row (it is in the baseline's record)."""
    return [
        f"name={name}-scaling{steps}", f"pretrain.steps={steps}", "pretrain.scheduler=constant", f"pretrain.warmup_ratio={(warmup + 0.5) / steps!r}",
        f"synthesize.dpc=[{dpc}]", f"synthesize.n_datasets={sets}", "evaluate.n_evals_per_dataset=1", "evaluate.full_data_samples=null",
    ]


def log_fit(steps: list[float], values: list[float]) -> dict | None:
    """Least squares ``value = y_mean + slope * (log2(steps) - x_mean)``: ``{"x_mean", "y_mean",
    "slope", "slope_se"}`` (``slope_se`` NaN with 2 points, where the residuals leave no degrees
    of freedom); None with fewer than 2 finite points (NaN values are left out). Units: those of
    ``values`` per doubling of steps."""
    x, y = np.log2(np.asarray(steps, float)), np.asarray(values, float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return None
    dx = x - x.mean()
    slope = float(dx @ (y - y.mean()) / (dx @ dx))
    dof = len(x) - 2
    residual = y - y.mean() - slope * dx
    se = math.sqrt(float(residual @ residual) / dof / float(dx @ dx)) if dof > 0 else float("nan")
    return {"x_mean": float(x.mean()), "y_mean": float(y.mean()), "slope": slope, "slope_se": se}


def crossing(fit: dict, level: float, slope: float | None = None) -> float | None:
    """The steps at which the fitted line reaches ``level``: ``2 ** (x_mean + (level - y_mean) / slope)``,
    with ``slope`` in place of the fit's if given (the line turned about the data's centre, where
    its value is known best). None when the slope is not positive (a flat or falling curve never
    crosses from below); inf beyond float range."""
    slope = fit["slope"] if slope is None else slope
    if not slope > 0:
        return None
    exponent = fit["x_mean"] + (level - fit["y_mean"]) / slope
    return float(2.0**exponent) if exponent < 1000 else float("inf")


# ---- one point -------------------------------------------------------------------------------------


def lm_only_fidelity(cfg: Config, data, per_label: int) -> dict:
    """Label fidelity of ``per_label`` samples per label of the point's stage-1 generator, held
    and sampled as synthesis does (``prepare``; bf16: under autocast)."""
    import time

    import torch

    from dilm_ray.evaluation.fidelity import reference_classifier
    from dilm_ray.layout import RunLayout
    from dilm_ray.models.generator import build_generator
    from dilm_ray.precision import prepare, resolve
    from dilm_ray.train.runtime import Runtime

    start = time.perf_counter()
    predict = reference_classifier(data.train, cfg.seed)
    gen = build_generator(cfg.generator, data.task, str(RunLayout(cfg.run_dir).generator_lm))
    runtime = Runtime(precision=resolve(cfg.precision, cfg.ray.use_gpu))
    gen.model.requires_grad_(False)
    prepare(gen.model, runtime.precision, runtime.device)  # held as synthesis holds it (train.synthesize)
    with runtime.autocast():
        samples, _, _ = gen.generate_all(per_label, cfg.generator, torch.Generator().manual_seed(cfg.seed), cfg.synthesize.max_attempts)
    hits = predict(samples) == samples.labels
    per = [float(hits[samples.labels == y].mean()) for y in range(data.task.num_labels)]
    return {"lm_only_fidelity": float(hits.mean()), "lm_only_fidelity_per_label": per, "lm_only_rows": int(len(samples)),
            "seconds_lm_only_fidelity": time.perf_counter() - start}


def continue_stage1(ctx, previous: Config | None, timer, log) -> None:
    """Stage 1 of the point: the previous point's generator continued to ``pretrain.steps``
    (from the packaged model at the first point). Skipped when done (same stage key)."""
    from dilm_ray.driver.ray_train import fit_stage
    from dilm_ray.layout import RunLayout
    from dilm_ray.pipeline.table import BY_NAME
    from dilm_ray.tracking.mlflow_store import tracking_uri

    stage = BY_NAME["pretrain"]
    # done only with its marker: fit_stage copies the generator and then its train_state.pt, and
    # a folder without a marker counts as done in the pipeline (outputs from before markers)
    if stage.done(ctx) and (ctx.layout.generator_lm / "stage.json").is_file():
        log(f"[pretrain] {ctx.cfg.pretrain.steps} steps done earlier, skipped")
        return
    source = state = None
    if previous is not None:
        before = RunLayout(previous.run_dir).generator_lm
        if not (before / "train_state.pt").is_file():
            raise UserError(f"{before} holds no finished stage-1 run to continue: run the points in order")
        source, state = str(before), str(before / "train_state.pt")
        log(f"[pretrain] continuing {before} ({previous.pretrain.steps} steps) to {ctx.cfg.pretrain.steps}")
    uri = tracking_uri(ctx.cfg) if ctx.run_id else None
    with timer.span("pretrain"):
        fit_stage(ctx.cfg, "pretrain", source, True, ctx.run_id, uri, state=state)
    stage.mark(ctx)


def baseline_runs(path: Path, key: str, dpc: int, learner: str) -> pd.DataFrame:
    """The baseline record's K-centers and random runs of ``learner`` at ``dpc``; ``UserError``
    when the record is missing, lacks either method, or its runs were scored under another
    evaluation key than ``key``."""
    if not path.is_file():
        raise UserError(f"--baseline {path}: no such runs.csv")
    runs = pd.read_csv(path, dtype={"eval_key": str, "set_digest": str})
    runs = runs[runs.method.isin(BASELINES) & (runs.dpc == dpc) & (runs.learner == learner)]
    missing = [b for b in BASELINES if b not in set(runs.method)]
    if missing:
        raise UserError(f"--baseline {path}: no {' or '.join(missing)} runs of {learner} at DPC {dpc}")
    other = sorted(set(runs.eval_key.astype(str)) - {key})
    if other:
        raise UserError(f"--baseline {path}: its runs were scored under evaluation key {other[0]}, this config's runs get {key} "
                        "(another learner, protocol, precision or validation rows): not comparable")
    return runs


def point_config(config: str, overrides: list[str], steps: int, sets: int, dpc: int) -> Config:
    """The config of the point at ``steps``; ``UserError`` when the profile's warm-up is not shorter."""
    base = load_config(config, overrides)
    if warmup_steps(base) >= steps:
        raise UserError(f"--points: the profile warms up for {warmup_steps(base)} steps (pretrain.steps x pretrain.warmup_ratio), "
                        f"not fewer than the point at {steps} steps")
    return load_config(config, [*overrides, *point_overrides(base.name, steps, warmup_steps(base), sets, dpc)])


def rebuild_stage1(config: str, overrides: list[str], steps: int, sets: int, dpc: int, previous: Config | None, record: Path,
                   log=click.echo) -> tuple[Config, dict | None]:
    """The stage-1 generator of the finished point at ``steps``, trained again when its run folder
    is gone (a fresh clone or machine: run folders are not part of the record) so that a later
    point can continue it. Call it for the points in order: each continues ``previous``'s.

    Returns the point's config and, when it trained, the generator's weight digest
    (``pipeline.record``'s 16 hex) and last logged metrics, recorded (the point's
    ``fingerprint.json``; None without one) and rebuilt: ``{"recorded", "rebuilt",
    "recorded_metrics", "rebuilt_metrics"}``. Unequal digests mean a later point continues a
    generator other than the one this point evaluated: bit for bit it is not (floating-point
    order with 2 threads, a mid-run resume of the record's run, another CPU's bf16 kernels, other
    code), and the LM losses say by how much. The log and the later point's ``point.json``
    (``rebuilt``) say so.
    """
    from dilm_ray.data import load_data
    from dilm_ray.layout import RunLayout
    from dilm_ray.pipeline.base import Context, check_inputs
    from dilm_ray.pipeline.record import generator_fingerprint
    from dilm_ray.seeding import setup_torch
    from dilm_ray.timing import StageTimer
    from dilm_ray.tracking.mlflow_store import mlflow_run

    cfg = point_config(config, overrides, steps, sets, dpc)
    layout = RunLayout(cfg.run_dir)
    if (layout.generator_lm / "train_state.pt").is_file():
        return cfg, None
    log(f"[point {steps}] its generator is not on this machine: stage 1 trained again, to continue it")
    setup_torch(cfg)
    check_inputs(cfg)
    data = load_data(cfg, need_validation=False)
    with mlflow_run(cfg, "scaling", Path(cfg.run_dir) / "mlflow-runs.json", resume=True) as run_id:
        continue_stage1(Context(cfg, data, METHODS, run_id, resume=True), previous, StageTimer(Path(cfg.run_dir) / "timing.json"), log)
    printed = record / f"point{steps}" / "fingerprint.json"
    was = json.loads(printed.read_text())["stages"]["pretrain"] if printed.is_file() else {}
    now = generator_fingerprint(layout, "pretrain")
    recorded, digest = was.get("weights"), now["weights"]
    # the last logged LM loss says how far apart unequal weights are (floating-point order or another run)
    log(f"[point {steps}] rebuilt generator {digest} ({now['last_metrics']}): "
        + ("equal to the record's" if digest == recorded else f"the record's is {recorded} ({was.get('last_metrics')}), NOT equal"))
    return cfg, {"recorded": recorded, "rebuilt": digest, "recorded_metrics": was.get("last_metrics"), "rebuilt_metrics": now["last_metrics"]}


def run_point(config: str, overrides: list[str], steps: int, sets: int, dpc: int, previous: Config | None, record: Path,
              baseline: Path, per_label: int, log=click.echo, rebuild=None) -> tuple[Config, dict]:
    """Run (or resume) the point at ``steps``; returns its config and its ``point.json`` row.

    ``rebuild``: called once the point is known to need running and its baseline to be
    comparable, before its stage 1; it makes the earlier points' generators again where they
    are gone and returns ``{steps: rebuild_stage1's digests}``, kept in the row as ``rebuilt``."""
    from dilm_ray.data import load_data
    from dilm_ray.evaluation.job import eval_key, protocol_config
    from dilm_ray.pipeline.base import Context, check_inputs, distill_key, synthesize_key
    from dilm_ray.pipeline.evaluate import evaluate_and_report
    from dilm_ray.pipeline.record import fingerprint
    from dilm_ray.pipeline.table import run_stages
    from dilm_ray.provenance import commit
    from dilm_ray.seeding import setup_torch
    from dilm_ray.timing import StageTimer
    from dilm_ray.tracking.mlflow_store import mlflow_run

    cfg = point_config(config, overrides, steps, sets, dpc)
    out = record / f"point{steps}"
    done = out / POINT_FILE
    setup_torch(cfg)
    check_inputs(cfg)
    data = load_data(cfg)
    key = eval_key(protocol_config(cfg, "dilm"), data.task, data.validation, cfg.learner.model)
    # what the point's numbers depend on: its stages' keys (the train rows, both models, stages 1-3),
    # the evaluation key (protocol, validation rows, precision), the DPC and the fidelity sample size
    asked = {"sets_key": synthesize_key(distill_key)(cfg), "eval_key": key, "dpc": dpc, "per_label": per_label}
    if done.is_file():
        row = json.loads(done.read_text())
        if row.get("asked") != asked:
            raise UserError(f"{done} was made with other settings (stage or evaluation keys, --dpc or --per-label): "
                            "use another --record folder, or the settings it was made with")
        if row["sets"] >= sets:
            log(f"[point {steps}] done earlier ({out}), skipped")
            return cfg, row
    code = commit()
    baseline_runs(baseline, key, dpc, cfg.learner.model)  # refuse before hours of training, not after
    layout_dir = Path(cfg.run_dir)
    rebuilt_file = layout_dir / "rebuilt.json"  # kept across this point's own resumes
    rebuilt = json.loads(rebuilt_file.read_text()) if rebuilt_file.is_file() else {}
    made = rebuild() if rebuild else {}
    if made:
        rebuilt.update(made)
        layout_dir.mkdir(parents=True, exist_ok=True)
        write_json(rebuilt_file, rebuilt)
    timer = StageTimer(layout_dir / "timing.json")
    log(f"[point {steps}] {cfg.name}: stage 1 to {steps} steps, stage 2, {sets} sets per method at DPC {dpc}")
    with mlflow_run(cfg, "scaling", layout_dir / "mlflow-runs.json", resume=True) as run_id:
        ctx = Context(cfg, data, METHODS, run_id, resume=True)
        continue_stage1(ctx, previous, timer, log)
        fid_file = layout_dir / f"lm_only_fidelity-{per_label}.json"
        if not fid_file.is_file():
            write_json(fid_file, lm_only_fidelity(cfg, data, per_label))
        lm_only = json.loads(fid_file.read_text())
        log(f"[point {steps}] LM-only label fidelity {100 * lm_only['lm_only_fidelity']:.1f}% of {lm_only['lm_only_rows']} samples")
        run_stages(ctx, timer, log)
        results = layout_dir / "results"
        report = evaluate_and_report(ctx, timer, results, [cfg.learner.model], {}, [dpc], (), "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    for method in METHODS:  # the sets the runs used, as text
        for path in sorted(ctx.layout.method_dir(method).glob(f"dpc{dpc}/set*/train.jsonl")):
            target = out / path.relative_to(ctx.layout.distilled)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    shutil.copyfile(results / "table.md", out / "table.md")
    (out / "fingerprint.json").write_text(json.dumps(fingerprint(cfg, ctx.layout, report.runs, code), indent=1) + "\n")
    # runs.csv may keep rows of more sets made earlier (a later point added): this point's sets only
    report.runs[report.runs["set_index"] < sets].assign(steps=steps).to_csv(out / "runs.csv", index=False)
    fidelity = {r.method: r.label_fidelity for r in report.table.itertuples()}
    stage_seconds = {f"seconds_{k}": v for k, v in timer.seconds.items()}
    row = {"steps": steps, "sets": sets, "dpc": dpc, "commit": code, "config": cfg.name, "asked": asked, "rebuilt": rebuilt, **lm_only,
           **{f"{m}_fidelity": fidelity.get(m) for m in METHODS}, **stage_seconds}
    write_json(done, row)
    return cfg, row


def write_json(path: Path, value: dict) -> None:
    """``value`` as JSON at ``path``, whole or not at all (a kill mid-write leaves the old file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


# ---- the record ------------------------------------------------------------------------------------


def summarize(record: Path, baseline: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points, runs) from the record: one row per finished point with each method's mean,
    std, runs and Welch p against each baseline (on per-set means, in %), and every run."""
    from dilm_ray.evaluation.stats import welch_p

    files = sorted(record.glob(f"point*/{POINT_FILE}"))
    rows = [json.loads(p.read_text()) for p in files]
    if not rows:
        return pd.DataFrame(), pd.DataFrame()
    runs = pd.concat([pd.read_csv(p.parent / "runs.csv", dtype={"eval_key": str, "set_digest": str}) for p in files])
    dpc = rows[0]["dpc"]
    learners, keys = set(runs.learner), set(runs.eval_key.astype(str))
    if len(learners) != 1 or len(keys) != 1:
        raise UserError(f"{record}: its points were scored by {len(learners)} learners under {len(keys)} evaluation keys: not one study")
    base = baseline_runs(baseline, keys.pop(), dpc, learners.pop())
    reference = {b: 100 * base[(base.method == b) & (base.dpc == dpc)].groupby("set_index").score.mean().to_numpy() for b in BASELINES}
    for row in rows:
        part = runs[runs.steps == row["steps"]]
        for method in METHODS:
            per_set = 100 * part[part.method == method].groupby("set_index").score.mean().to_numpy()
            row[f"{method}_mean"], row[f"{method}_std"], row[f"{method}_runs"] = per_set.mean(), per_set.std(ddof=1), len(per_set)
            for b, values in reference.items():
                row[f"{method}_p_vs_{b}"] = welch_p(list(per_set), list(values))
    points = pd.DataFrame(rows).sort_values("steps")
    for b, values in reference.items():
        points[f"{b}_mean"], points[f"{b}_std"], points[f"{b}_runs"] = values.mean(), values.std(ddof=1), len(values)
    return points, runs


def reading(points: pd.DataFrame) -> list[str]:
    """The fit of fidelity and score against log2(steps), and where the score would cross K-centers."""
    lines = []
    steps = list(points.steps)
    rate = stage1_seconds_per_step(points)
    for column, what in (("lm_only_fidelity", "LM-only fidelity (%)"), ("dilm_fidelity", "DiLM fidelity (%)"),
                         ("dilm_filtered_fidelity", "DiLM with the filter, fidelity (%)"), ("dilm_mean", "DiLM score"), ("dilm_filtered_mean", "DiLM with the filter, score")):
        scale = 100 if "fidelity" in column else 1
        fit = log_fit(steps, list(scale * points[column]))
        if fit is None:
            lines.append(f"- {what}: one point, no trend yet.")
            continue
        dof = len(steps) - 2
        se = "" if math.isnan(fit["slope_se"]) else f" ± {fit['slope_se']:.2f} (SE, {dof} degree{'s' if dof > 1 else ''} of freedom)"
        text = f"- {what}: {fit['slope']:+.2f}{se} per doubling of LM steps."
        if column.endswith("_mean"):
            level = float(points["k_centers_mean"].iloc[0])
            found = crossing(fit, level)
            if found is not None and found <= max(steps):  # the line passes K-centers inside the points, or before them
                where = (f"at every point measured (it meets K-centers at about {found:,.0f} steps, before the first)" if found < min(steps)
                         else f"from about {found:,.0f} steps, within the points measured")
                text += f" The line is at or above K-centers ({level:.1f}) {where}: see their p"
                lines.append(text + ".")
                continue
            text += f" Crossing K-centers ({level:.1f}): " + (f"at about {found:,.0f} steps" if found else "never, at this slope")
            if found and not math.isnan(fit["slope_se"]):
                ends = [crossing(fit, level, fit["slope"] + sign * fit["slope_se"]) for sign in (1, -1)]
                text += " (slope ± 1 SE, turned about the data's centre: " + " to ".join("never" if e is None else f"{e:,.0f}" for e in ends) + ")"
            if found and math.isfinite(found) and rate:
                text += f"; stage 1 to there: {hours(found * rate)} on this machine at {rate:.2f} s per LM step"
            text += "."
        lines.append(text)
    return lines


def stage1_seconds_per_step(points: pd.DataFrame) -> float | None:
    """Seconds per stage-1 LM step: the median over the points after the first of their stage-1
    time over the steps they added (the first point's run may have resumed mid-way); None
    without such a point."""
    if "seconds_pretrain" not in points or len(points) < 2:
        return None
    added = points.steps.diff().iloc[1:]
    rates = (points.seconds_pretrain.iloc[1:] / added).dropna()
    return float(rates.median()) if len(rates) else None


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds < 3600 * 1e6 else "over a million hours"


def plot(points: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"lm_only": "C2", "dilm": "C0", "dilm_filtered": "C1"}  # one colour per method in both panels
    for method, label in (("lm_only", "LM-only"), ("dilm", "DiLM"), ("dilm_filtered", "DiLM + label filter")):
        left.plot(points.steps, 100 * points[f"{method}_fidelity"], marker="o", color=colors[method], label=label)
    left.axhline(100 / len(points.lm_only_fidelity_per_label.iloc[0]), color="grey", ls=":", label="chance")
    left.set(xscale="log", xlabel="stage-1 LM steps (log)", ylabel="label fidelity (%)", title="Does the text follow its label?")
    for method, label in (("dilm", "DiLM"), ("dilm_filtered", "DiLM + label filter")):
        right.errorbar(points.steps, points[f"{method}_mean"], yerr=points[f"{method}_std"], marker="o", capsize=3, color=colors[method], label=label)
    for b, style in zip(BASELINES, ("--", ":")):
        right.axhline(float(points[f"{b}_mean"].iloc[0]), color="black", ls=style, label=f"{b} (record)")
    right.set(xscale="log", xlabel="stage-1 LM steps (log)", ylabel="score (%; QQP: mean of accuracy and F1)", title=f"Score at DPC {int(points.dpc.iloc[0])} (mean ± std over sets)")
    for ax in (left, right):
        ax.minorticks_off()
        ax.set_xticks(list(points.steps), [str(s) for s in points.steps])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(record: Path, baseline: Path, commands: list[str]) -> str:
    """Rewrite ``points.csv``, ``runs.csv``, ``scaling.png`` and ``table.md``; returns the markdown."""
    from dilm_ray.provenance import machine

    points, runs = summarize(record, baseline)
    if points.empty:
        return "no point finished yet"
    points.to_csv(record / "points.csv", index=False)
    runs.to_csv(record / "runs.csv", index=False)
    plot(points, record / "scaling.png")
    header = ("| LM steps | sets | fidelity % LM-only / DiLM / DiLM + filter | DiLM (mean ± std) | p vs K-centers / random | "
              "DiLM + filter | p vs K-centers / random | stage-1 min (continuing the previous point) |")
    lines = [header, "|" + "---|" * 8]
    for r in points.itertuples():
        lines.append(
            f"| {r.steps} | {r.dilm_runs} | {100 * r.lm_only_fidelity:.1f} / {100 * r.dilm_fidelity:.1f} / {100 * r.dilm_filtered_fidelity:.1f} | "
            f"{r.dilm_mean:.1f} ± {r.dilm_std:.1f} | {r.dilm_p_vs_k_centers:.3g} / {r.dilm_p_vs_random:.3g} | "
            f"{r.dilm_filtered_mean:.1f} ± {r.dilm_filtered_std:.1f} | {r.dilm_filtered_p_vs_k_centers:.3g} / {r.dilm_filtered_p_vs_random:.3g} | "
            f"{getattr(r, 'seconds_pretrain', float('nan')) / 60:.1f} |"
        )
    first = points.iloc[0]
    base = (f"K-centers {first.k_centers_mean:.1f} ± {first.k_centers_std:.1f} and random {first.random_mean:.1f} ± {first.random_std:.1f} "
            f"({first.k_centers_runs} sets each, from {baseline.name} of the record); p: Welch on per-set means.")
    host = machine()
    text = "\n".join([
        "Produced by", "", "```bash", *commands, "```", "", *lines, "", base, "", "Fit against log2(LM steps):", "", *reading(points), "",
        f"Machine of this report: {host['cpu']} (bf16 instructions: {', '.join(host['bf16_instructions']) or 'none'}), {host['cpus']} CPUs; "
        "each point's own machine and commit are in its fingerprint.json.",
    ]) + "\n"
    (record / "table.md").write_text(text)
    return text


def commands_of(record: Path, command: str | None) -> list[str]:
    path = record / "commands.txt"
    found = path.read_text().splitlines() if path.is_file() else []
    if command and command not in found:
        found.append(command)
        record.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(found) + "\n")
    return found


@click.group()
def main() -> None:
    pass


@main.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--points", "points_", default="480,960,1920,3840", show_default=True, help="LM steps of the points, comma-separated, increasing")
@click.option("--sets", default=5, show_default=True, help="sets per method (1 learner seed each) at every point but the last")
@click.option("--last-sets", default=10, show_default=True, help="sets per method at the last point")
@click.option("--dpc", default=10, show_default=True)
@click.option("--per-label", default=100, show_default=True, help="LM-only samples per label for its label fidelity")
@click.option("--record", type=click.Path(file_okay=False, path_type=Path), default=RECORD, show_default=True)
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), default=BASELINE, show_default=True, help="runs.csv holding the K-centers and random runs")
def run(config: str, overrides: tuple[str, ...], points_: str, sets: int, last_sets: int, dpc: int, per_label: int, record: Path, baseline: Path) -> None:
    """Run (or resume) every point in order, rewriting the record after each."""
    interrupts.install()
    try:
        try:
            steps = [int(s) for s in points_.split(",")]
        except ValueError:
            raise UserError(f"--points {points_}: expected increasing integers, e.g. 480,960") from None
        if not steps or steps != sorted(set(steps)) or steps[0] < 1:
            raise UserError(f"--points {points_}: expected increasing positive integers, e.g. 480,960")
        options = [f"--points {points_}", f"--sets {sets}", f"--last-sets {last_sets}", f"--dpc {dpc}", f"--per-label {per_label}"]
        command = " ".join(["python benchmarks/scaling.py run", config, *overrides, *options])
        commands = commands_of(record, command)
        sets_at = {n: last_sets if n == steps[-1] else sets for n in steps}

        def rebuild_before(i: int) -> dict:  # the generators of the points before steps[i], in order
            chain, rebuilt = None, {}
            for m in steps[:i]:
                chain, made = rebuild_stage1(config, list(overrides), m, sets_at[m], dpc, chain, record)
                if made:
                    rebuilt[str(m)] = made
            return rebuilt

        previous = None
        for i, n in enumerate(steps):
            previous, _ = run_point(config, list(overrides), n, sets_at[n], dpc, previous, record, baseline, per_label,
                                    rebuild=lambda i=i: rebuild_before(i))
            click.echo(write_report(record, baseline, commands))
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as err:
        click.echo(f"interrupted ({err}): finished points, stages and evaluation runs are kept; run the same command to continue", err=True)
        sys.exit(interrupts.exit_code(err))


@main.command()
@click.option("--record", type=click.Path(file_okay=False, path_type=Path), default=RECORD, show_default=True)
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), default=BASELINE, show_default=True)
def report(record: Path, baseline: Path) -> None:
    """Table, fit and plot from the record alone."""
    click.echo(write_report(record, baseline, commands_of(record, None)))


if __name__ == "__main__":
    main()
