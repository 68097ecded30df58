"""Stage keys and evaluation keys are listed field by field, and pinned.

``tests/fixtures/golden-keys.json`` holds, for every shipped config in fp32 and in bf16, the key
of every stage and the ``eval_key`` of every platform learner and of the full-data row (on a
fixed stand-in for the validation rows), as the code at ea4181d made them: the last commit before
the keys were listed explicitly. A change that moves any of them invalidates finished runs and
records, so it must be deliberate: regenerate with ``DILM_WRITE_GOLDEN_KEYS=1 pytest
tests/test_pipeline_keys.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dilm_ray.config import load_config
from dilm_ray.data import TextSet
from dilm_ray.data.tasks import resolve_task
from dilm_ray.evaluation.job import FULL_DATA, eval_key, protocol_config
from dilm_ray.pipeline.table import STAGES

ROOT = Path(__file__).parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "golden-keys.json"
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/bench/*.yaml")])
LEARNERS = ("minilm-l6", "smollm2-135m", "scratch-transformer", "tfidf-logreg", "icl:smollm2-135m")


def all_keys(cfg) -> dict[str, str]:
    task = resolve_task(cfg.data)
    validation = TextSet(task.text_columns, tuple(tuple(f"v{i} {c}" for c in task.text_columns) for i in range(6)), np.arange(6) % task.num_labels)
    keys = {s.name: s.key(cfg) for s in STAGES}
    for learner in sorted({cfg.learner.model, *cfg.evaluate.learners, *LEARNERS}):
        keys[f"eval:{learner}"] = eval_key(cfg, task, validation, learner)
    keys["eval:full_data"] = eval_key(protocol_config(cfg, FULL_DATA), task, validation, cfg.learner.model)
    return keys


def test_every_key_of_every_shipped_config_is_the_pinned_one():
    made = {f"{path} precision={p}": all_keys(load_config(ROOT / path, [f"precision={p}"])) for path in CONFIGS for p in ("fp32", "bf16")}
    if os.environ.get("DILM_WRITE_GOLDEN_KEYS"):
        GOLDEN.write_text(json.dumps(made, indent=1, sort_keys=True))
    assert made == json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("section", ["data", "generator", "learner", "pretrain", "distill", "synthesize", "evaluate", "ray", "tracking"])
def test_a_new_field_in_a_section_changes_no_key(monkeypatch, section):
    """A field added to a config section (here: an extra attribute every section dump carries)
    enters no key until it is listed: finished runs stay valid."""
    from pydantic import BaseModel

    cfg = load_config(ROOT / "configs/sst2-cpu.yaml", ["precision=fp32"])
    before = all_keys(cfg)
    sub = getattr(cfg, section)
    real = type(sub).model_dump

    def with_new_field(self: BaseModel, *args, **kwargs):
        dumped = real(self, *args, **kwargs)
        return {**dumped, "a_new_setting": 3} if self is sub else dumped

    monkeypatch.setattr(type(sub), "model_dump", with_new_field)
    assert getattr(cfg, section).model_dump(mode="json")["a_new_setting"] == 3
    assert all_keys(cfg) == before


def test_a_run_folder_made_at_the_parent_commit_resumes_without_running_anything(tiny_overrides, tiny_lm_dir, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    """``tests/fixtures/parent-run`` was made by the code before the keys were listed (see its
    README): ``dilm-ray run --resume`` on it skips every stage and keeps every evaluation run."""
    import dilm_ray.pipeline.evaluate as evaluate
    from dilm_ray.commands.run import run_command

    shutil.copytree(ROOT / "tests/fixtures/parent-run", tmp_path / "runs" / "t")
    monkeypatch.chdir(tmp_path)  # the fixture's model names are relative: tiny-lm, tiny-bert
    over = [o for o in tiny_overrides if not o.startswith(("generator.model", "learner.model", "output_dir"))]
    cfg = load_config(ROOT / "configs/sst2-cpu.yaml", [*over, "generator.model=tiny-lm", "learner.model=tiny-bert", f"output_dir={tmp_path / 'runs'}",
                                                       "evaluate.parallel=false", "precision=fp32"])
    # put in place after loading, as when the fixture was made: load_config makes an existing local path absolute
    shutil.copytree(tiny_lm_dir, tmp_path / "tiny-lm")
    shutil.copytree(tiny_bert_dir, tmp_path / "tiny-bert")
    monkeypatch.setattr(evaluate, "run_job", lambda *a, **k: pytest.fail("an evaluation run ran again"))
    before = pd.read_csv(tmp_path / "runs/t/results/runs.csv")
    table = run_command(cfg, resume=True)
    out = capsys.readouterr().out
    for stage in ("pretrain", "distill", "synthesize_dilm", "synthesize_lm_only", "coreset"):
        assert f"[{stage}] done earlier, skipped" in out
    assert f"[evaluate] {len(before)} of {len(before)} runs done earlier" in out
    assert json.loads((tmp_path / "runs/t/timing.json").read_text())["runs"] == {}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "runs/t/results/runs.csv"), before)
    assert "dilm" in table
