"""The main job's records: fingerprints that name where two runs diverge, the stratified test
over seeds, the record script, and the README's table checked against seed 42's record."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dilm_ray.evaluation.stats import stratified_permutation_p, stratified_power
from dilm_ray.pipeline.record import first_divergence

REPO = Path(__file__).parents[1]
RECORD = REPO / "benchmarks" / "results" / "main-job"


def _fingerprint(**changes):
    base = {
        "stages": {
            "pretrain": {"weights": "a1", "last_metrics": "[pretrain 300] lm_loss=3.1"},
            "distill": {"weights": "b2", "last_metrics": "[distill 60] match_loss=0.2"},
            "sets": {"dilm/dpc10": ["s1", "s2"], "random/dpc10": ["r1", "r2"]},
            "evaluate": {"minilm-l6/dilm/dpc10/set0/seed42": 0.7},
        }
    }
    for path, value in changes.items():
        stage, key = path.split("__")
        base["stages"][stage][key] = value
    return base


def test_the_first_stage_that_differs_is_named():
    same = _fingerprint()
    assert first_divergence(same, _fingerprint()) is None
    assert first_divergence(same, _fingerprint(evaluate__x=1)).startswith("evaluate")
    assert first_divergence(same, _fingerprint(sets__dilm_dpc10=["z"], evaluate__x=1)).startswith("sets")
    # a stage-1 difference is named first, though everything after it differs too
    assert first_divergence(same, _fingerprint(pretrain__weights="c3", distill__weights="d4")) == "pretrain (weights differ)"


def test_a_stage_log_line_is_fingerprinted_without_its_timings(tmp_path):
    from dilm_ray.pipeline.record import last_metric_line

    log = tmp_path / "distill-rank0.log"
    log.write_text("[distill 5] match_loss=0.3 seconds_match=1.2\nnoise\n[distill 10] match_loss=0.2 grad_sim=0.8 seconds_generate=3.1 seconds_match=1.0\n")
    assert last_metric_line(log, "distill") == "[distill 10] match_loss=0.2 grad_sim=0.8"
    assert last_metric_line(log, "pretrain") is None and last_metric_line(tmp_path / "none.log", "distill") is None


def test_the_stratified_test_cancels_seed_shifts_and_sees_a_consistent_lead():
    rng = np.random.default_rng(0)
    # DiLM 2 points ahead at every seed, seeds shifting both methods by +-10 points
    strata = [(rng.normal(70 + s, 1.5, 8), rng.normal(68 + s, 1.5, 8)) for s in (-10, 0, 10)]
    assert stratified_permutation_p(strata) < 0.01
    pooled = (np.concatenate([a for a, _ in strata]), np.concatenate([b for _, b in strata]))
    assert stratified_permutation_p([pooled]) > 0.05  # unstratified, the seed shifts hide the lead
    null = [(rng.normal(70 + s, 1.5, 8), rng.normal(70 + s, 1.5, 8)) for s in (-10, 0, 10)]
    assert stratified_permutation_p(null) > 0.05
    assert stratified_permutation_p(strata, seed=3) == pytest.approx(stratified_permutation_p(strata, seed=4), abs=0.01)
    assert np.isnan(stratified_permutation_p([([], [1.0])]))


def test_power_follows_the_normal_approximation_of_the_stratified_lead():
    rng = np.random.default_rng(0)
    unit = lambda x: (x - x.mean()) / x.std(ddof=1)  # noqa: E731  sample variance exactly 1
    a, b = unit(rng.normal(size=8)) + 1.0, unit(rng.normal(size=8))
    # one stratum, se = sqrt(1/8 + 1/8) = 0.5, lead 1: power = Phi(2 - 1.96) + Phi(-2 - 1.96)
    power, sets = stratified_power([(a, b)])
    assert power == pytest.approx(0.5160, abs=1e-3)
    assert sets == pytest.approx((1.959964 + 0.841621) ** 2 * 2, rel=1e-4)  # 15.7 sets per side for 80%
    power4, sets4 = stratified_power([(a, b)] * 4)  # four seeds alike: se halves, a quarter of the sets
    assert power4 == pytest.approx(0.9793, abs=1e-3) and sets4 == pytest.approx(sets / 4, rel=1e-9)
    assert stratified_power([(b + 1.0, b)])[1] == pytest.approx(sets)  # equal variances: the same plan
    assert all(np.isnan(stratified_power([(a[:1], b)])))  # herding's one set: no variance to plan with


def _run_folder(tmp_path: Path, seed: int, dilm_bonus: float) -> Path:
    """A run folder's results as ``dilm-ray run`` writes them: 4 sets x 1 seed per method."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, mean in (("dilm", 0.70 + dilm_bonus), ("random", 0.70), ("k_centers", 0.69)):
        for i in range(4):
            rows.append({"learner": "minilm-l6", "method": method, "dpc": 10, "set_index": i, "seed": seed + i, "score": mean + rng.normal(0, 0.01),
                         "set_digest": f"{method}{i}"})
    run = tmp_path / f"run{seed}"
    results = run / "results"
    results.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(results / "runs.csv", index=False)
    (results / "table.md").write_text("| learner | DPC | method | accuracy |\n|---|---|---|---|\n| minilm-l6 | 10 | dilm | 70.0 |\n")
    (results / "timing.md").write_text("| stage | seconds |\n")
    (results / "fingerprint.json").write_text(json.dumps({**_fingerprint(), "config": "sst2-cpu", "seed": seed, "commit": "abc", "precision": "fp32",
                                                          "machine": {"cpu": "AMD EPYC", "bf16_instructions": [], "torch": "2"}}))
    return run


def test_record_then_report_over_seeds(tmp_path):
    into = tmp_path / "main-job"
    for seed in (42, 43, 44):
        run = _run_folder(tmp_path, seed, 0.03)
        if seed == 44:  # a fingerprint that holds the command's config file and overrides
            path = run / "results" / "fingerprint.json"
            typed = {"config_file": "configs/sst2-cpu.yaml", "overrides": ["seed=44", "name=sst2-cpu-seed44", "synthesize.dpc=[5, 10]"]}
            path.write_text(json.dumps({**json.loads(path.read_text()), **typed}))
        done = subprocess.run([sys.executable, "benchmarks/main_job.py", "record", str(run), "--into", str(into)], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in into.iterdir()) == ["seed42", "seed43", "seed44"]
    meta = json.loads((into / "seed43" / "record.json").read_text())
    assert meta["command"] == "dilm-ray run configs/sst2-cpu.yaml seed=43" and meta["cpu"] == "AMD EPYC"
    meta = json.loads((into / "seed44" / "record.json").read_text())
    assert meta["command"] == "dilm-ray run configs/sst2-cpu.yaml seed=44 name=sst2-cpu-seed44 'synthesize.dpc=[5, 10]'"
    done = subprocess.run([sys.executable, "benchmarks/main_job.py", "report", "--root", str(into)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    summary = (into / "summary.md").read_text()
    runs = {seed: pd.read_csv(into / f"seed{seed}" / "runs.csv") for seed in (42, 43, 44)}
    lead = np.mean([100 * (r[r.method == "dilm"].score.mean() - r[r.method == "random"].score.mean()) for r in runs.values()])
    assert f"| random | {lead:+.1f} | 3 of 3 | 5e-05 |" in summary  # ahead at every seed: no permutation beats the observed lead
    assert "| k_centers |" in summary and "| random | 43 | 4, 4 |" in summary
    sets = lambda r, m: 100 * r[r.method == m].groupby("set_index").score.mean().to_numpy()  # noqa: E731
    power, needed = stratified_power([(sets(r, "dilm"), sets(r, "random")) for r in runs.values()])
    assert f"| random | {lead:+.1f} | 3 of 3 | 5e-05 | {power:.2f} | {needed:.0f} |" in summary  # the report prints the plan it computes


def test_choose_ranks_candidates_by_dilm_over_seeds(tmp_path):
    root = tmp_path / "dev"
    for name, bonus in (("weak", -0.02), ("strong", 0.05), ("middle", 0.01)):
        for seed in (42, 43):
            run = _run_folder(tmp_path / name, seed, bonus)
            done = subprocess.run([sys.executable, "benchmarks/main_job.py", "record", str(run), "--into", str(root / name)], capture_output=True, text=True, cwd=REPO)
            assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "benchmarks/main_job.py", "choose", str(root)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = [line for line in (root / "choice.md").read_text().splitlines() if line.startswith("| ") and not line.startswith("| candidate")]
    assert [row.split(" | ")[0] for row in rows] == ["| strong", "| middle", "| weak"]
    cells = rows[0].split(" | ")
    runs = [pd.read_csv(root / "strong" / f"seed{seed}" / "runs.csv") for seed in (42, 43)]
    means = [100 * r[r.method == "dilm"].score.mean() for r in runs]
    assert cells[1:5] == [f"{means[0]:.1f}", f"{means[1]:.1f}", f"{np.mean(means):.1f}", "-"]
    assert float(rows[2].split(" | ")[4]) < 0.05  # 7 points behind the leader at both seeds, 4 sets each

    (root / "late" / "seed44").mkdir(parents=True)  # a candidate recorded at other seeds cannot be ranked with the rest
    shutil.copy(root / "weak" / "seed42" / "runs.csv", root / "late" / "seed44" / "runs.csv")
    done = subprocess.run([sys.executable, "benchmarks/main_job.py", "choose", str(root)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "different seeds" in done.stderr


def test_recording_an_unfinished_run_fails_naming_what_is_missing(tmp_path):
    run = _run_folder(tmp_path, 42, 0.0)
    (run / "results" / "fingerprint.json").unlink()
    done = subprocess.run([sys.executable, "benchmarks/main_job.py", "record", str(run), "--into", str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "fingerprint.json" in done.stderr and not (tmp_path / "x").exists()


def test_check_readme_table_names_the_first_stage_that_differs(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from check_readme_table import check
    finally:
        sys.path.pop(0)
    record = tmp_path / "record"
    run = _run_folder(tmp_path, 42, 0.0)
    shutil.copytree(run / "results", record)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + (run / "results" / "table.md").read_text() + "\nmore text\n")
    assert check(run, readme, record)[0] == 0
    (run / "results" / "table.md").write_text((run / "results" / "table.md").read_text().replace("70.0", "71.5"))
    fingerprint = json.loads((run / "results" / "fingerprint.json").read_text())
    fingerprint["stages"]["distill"]["weights"] = "other"
    (run / "results" / "fingerprint.json").write_text(json.dumps(fingerprint))
    status, text = check(run, readme, record)
    assert status == 1 and "71.5" in text and "first stage that differs: distill (weights differ)" in text
    assert "stage 1" not in text  # only a stage-1 difference is explained
    fingerprint["stages"]["pretrain"]["weights"] = "other"
    recorded = json.loads((record / "fingerprint.json").read_text())
    for change, reason in (({}, "same CPU kind, precision, threads and torch"), ({"threads": 1}, "(threads differs)"),
                           ({"precision": "bf16", "threads": 1}, "(precision, threads differ)")):
        (run / "results" / "fingerprint.json").write_text(json.dumps({**fingerprint, "threads": 2, **change}))
        (record / "fingerprint.json").write_text(json.dumps({**recorded, "threads": 2}))
        status, text = check(run, readme, record)
        assert "first stage that differs: pretrain" in text and reason in text, text
    assert check(tmp_path / "nowhere", readme, record)[0] == 2


def test_the_readme_shows_seed_42s_recorded_table():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from check_readme_table import markdown_table
    finally:
        sys.path.pop(0)
    recorded = markdown_table((RECORD / "seed42" / "table.md").read_text())
    assert recorded and markdown_table((REPO / "README.md").read_text()) == recorded
