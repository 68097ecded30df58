"""A run's fingerprint: a digest of what each stage produced, with the code and the machine.

Two runs of one config agree stage by stage until the first stage whose output differs; that
stage is where they diverged (another CPU's kernels, a code change). ``dilm-ray run`` writes
``results/fingerprint.json``; ``scripts/check_readme_table.py`` compares a fresh run's with the
README's record and names the first stage that differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dilm_ray.config import Config
from dilm_ray.keys import content_key, file_digest
from dilm_ray.layout import RunLayout
from dilm_ray.provenance import commit, machine

FINGERPRINT_FILE = "fingerprint.json"
# pipeline order: the first of these that differs between two runs is where they diverged
STAGE_ORDER = ("pretrain", "distill", "sets", "evaluate")


def _digest(paths: list[Path]) -> str | None:
    """16 hex characters identifying the files' bytes; None for no files."""
    return content_key(*(file_digest(p) for p in sorted(paths))) if paths else None


def last_metric_line(log: Path, stage: str) -> str | None:
    """The last metric line of ``stage`` in its rank-0 worker log (``[pretrain 300] lm_loss=...``),
    without its timings (``seconds_*``: wall clock, never equal between two runs)."""
    if not log.is_file():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip().startswith(f"[{stage} ")]
    if not lines:
        return None
    return " ".join(part for part in lines[-1].split() if not part.startswith("seconds"))


def generator_fingerprint(layout: RunLayout, stage: str) -> dict:
    """``{"weights", "last_metrics"}`` of the generator ``stage`` (``pretrain``/``distill``) wrote
    in ``layout``: a digest (16 hex) of its safetensors files and the last metric line of its
    rank-0 log, each None where the stage did not run."""
    folder = layout.generator(stage)
    weights = _digest(list(folder.glob("*.safetensors"))) if folder.is_dir() else None
    return {"weights": weights, "last_metrics": last_metric_line(layout.worker_log(stage, 0), stage)}


def fingerprint(cfg: Config, layout: RunLayout, runs: pd.DataFrame, code: str | None = None) -> dict:
    """The fingerprint of the run in ``layout`` whose evaluation rows are ``runs`` (``runs.csv``).

    ``pretrain``/``distill``: a digest (16 hex) of the generator's safetensors files and the last
    metric line of its rank-0 log (None where the stage did not run); ``sets``: per
    ``method/dpc<D>``, the digest of each set in set order (``runs.csv``'s ``set_digest``);
    ``evaluate``: the score of each run, keyed ``<learner>/<method>/dpc<D>/set<i>/seed<s>``, rounded
    to 6 decimals. With the config's name and seed, the config file and overrides it was loaded
    with (``Config.config_file``, ``Config.overrides``: the command's arguments), the commit (``code``: ``provenance.commit()``
    taken when the run started; by default now), the resolved precision, the threads and ``provenance.machine()``.
    """
    stages: dict[str, object] = {stage: generator_fingerprint(layout, stage) for stage in ("pretrain", "distill")}
    sets: dict[str, list[str]] = {}
    for (method, dpc), part in runs.groupby(["method", "dpc"], sort=True):
        by_set = part.drop_duplicates("set_index").sort_values("set_index")
        sets[f"{method}/dpc{dpc}"] = by_set["set_digest"].astype(str).str[:16].tolist()
    stages["sets"] = sets
    stages["evaluate"] = {  # NaN (a failed score) as None: NaN never equals itself after a JSON round trip
        f"{r.learner}/{r.method}/dpc{r.dpc}/set{r.set_index}/seed{r.seed}": None if pd.isna(r.score) else round(float(r.score), 6)
        for r in runs.sort_values(["learner", "method", "dpc", "set_index", "seed"]).itertuples()
    }
    return {
        "config": cfg.name, "seed": cfg.seed, "config_file": cfg.config_file, "overrides": list(cfg.overrides), "commit": code or commit(), "precision": cfg.precision, "threads": cfg.threads, "machine": machine(),
        "stages": stages,
    }


def write_fingerprint(cfg: Config, layout: RunLayout, runs: pd.DataFrame, out_dir: Path, code: str | None = None) -> Path:
    """``fingerprint`` as ``out_dir/fingerprint.json``; returns its path."""
    path = out_dir / FINGERPRINT_FILE
    path.write_text(json.dumps(fingerprint(cfg, layout, runs, code), indent=1) + "\n")
    return path


def first_divergence(a: dict, b: dict) -> str | None:
    """The first stage (``STAGE_ORDER``) whose fingerprint differs between ``a`` and ``b``, with
    what differs in it, as one phrase; None when every stage agrees."""
    for stage in STAGE_ORDER:
        x, y = a["stages"].get(stage), b["stages"].get(stage)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            keys = [k for k in sorted({*x, *y}) if x.get(k) != y.get(k)]
            return f"{stage} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''} differ)"
        return stage
    return None
