"""The full-data row: each learner trained on many real train rows, beside the distilled sets."""

import json

from click.testing import CliRunner

from dilm_ray.cli import main
from dilm_ray.config import load_config
from dilm_ray.evaluation.job import FULL_DATA, eval_key, plan_for_learners, protocol_config


def test_the_full_data_row_gets_its_own_seeds_and_no_icl_jobs():
    groups = {("dilm", 10): ["s0", "s1"], (FULL_DATA, 500): ["rows"]}
    plan = plan_for_learners(groups, ["minilm-l6", "tfidf-logreg", "icl:m"], 2, 3, {"tfidf-logreg": 1}, 42, full_data_seeds=2)
    full = [(j.learner, j.dpc, j.set_index, j.seed) for j in plan if j.method == FULL_DATA]
    assert full == [("minilm-l6", 500, 0, 42), ("minilm-l6", 500, 0, 43), ("tfidf-logreg", 500, 0, 42)]
    assert len([j for j in plan if j.method == "dilm" and j.learner == "minilm-l6"]) == 2 * 3  # the sets' plan is unchanged


def test_full_data_settings_leave_the_sets_keys_alone_and_key_the_row_by_its_steps(tiny_overrides):
    from dilm_ray.data import load_data

    plain = load_config("configs/sst2-cpu.yaml", tiny_overrides)
    full = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "evaluate.full_data_samples=60", "evaluate.full_data_steps=7"])
    data = load_data(plain)
    key = lambda cfg: eval_key(cfg, data.task, data.validation, "minilm-l6")  # noqa: E731
    assert key(full) == key(plain)  # recorded rows of the sets stay valid when the row is switched on
    assert protocol_config(full, FULL_DATA).evaluate.steps == 7 and protocol_config(full, "dilm") is full
    assert key(protocol_config(full, FULL_DATA)) != key(full)
    other = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "evaluate.full_data_samples=60", "evaluate.full_data_steps=8"])
    assert key(protocol_config(other, FULL_DATA)) != key(protocol_config(full, FULL_DATA))


def test_evaluate_adds_a_full_data_row_per_learner_and_resumes_it(tiny_overrides, tmp_path):
    folder = tmp_path / "sets" / "mine"
    folder.mkdir(parents=True)
    (folder / "set0.jsonl").write_text("".join(json.dumps({"sentence": f"{'great' if y else 'bad'} {k}", "label": y}) + "\n" for y in (0, 1) for k in range(3)))
    args = ["evaluate", "configs/sst2-cpu.yaml", *tiny_overrides, "evaluate.parallel=false", "evaluate.full_data_samples=40",
            "evaluate.full_data_steps=2", "evaluate.full_data_seeds=2", "--data", str(tmp_path / "sets")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [line.split(" | ")[1:5] for line in result.output.splitlines() if " | full_data | " in line]
    assert [(dpc, method, runs) for dpc, method, _, runs in rows] == [("20", "full_data", "2")]  # 40 balanced rows: 20 per label
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0 and "4 of 4 runs done earlier" in again.output, again.output
