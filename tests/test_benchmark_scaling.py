"""benchmarks/scaling.py: a stage-1 run continued from its state is the longer run; the study,
interrupted at a later point, resumes without redoing finished points or stages; the fit."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import benchmark_script


def test_the_warmup_is_the_profiles_at_every_point_and_the_fit_reads_log_steps():
    scaling = benchmark_script("scaling")
    for steps in (480, 960, 1920, 3840, 7):
        ratio = float(next(o for o in scaling.point_overrides("q", steps, 24 if steps > 7 else 3, 5, 10) if o.startswith("pretrain.warmup_ratio")).split("=")[1])
        assert int(steps * ratio) == (24 if steps > 7 else 3)
    fit = scaling.log_fit([480, 960, 1920, 3840], [50.0, 52.0, 54.5, 55.5])
    assert fit["slope"] == pytest.approx(1.9) and fit["slope_se"] == pytest.approx(0.2121, abs=1e-3)  # sqrt(0.45 / 2 / 5)
    # centre: log2(480) + 1.5, mean 53; 56 is 3 / 1.9 doublings further
    assert scaling.crossing(fit, 56.0) == pytest.approx(480 * 2 ** (1.5 + 3 / 1.9))
    # the SE range turns the line about that centre: it brackets the crossing closely, not from 1 step
    low, high = (scaling.crossing(fit, 56.0, 1.9 + d) for d in (0.2121, -0.2121))
    assert 3500 < low < scaling.crossing(fit, 56.0) < high < 4800
    assert scaling.crossing(fit, 56.0, -0.5) is None and scaling.crossing(fit, 56.0, 1e-4) == float("inf")  # falling; beyond float range
    assert np.isnan(scaling.log_fit([480, 960], [50.0, 51.0])["slope_se"]) and scaling.log_fit([480], [50.0]) is None
    assert scaling.log_fit([480, 960, 1920], [50.0, float("nan"), 52.0])["slope"] == pytest.approx(1.0)  # a missing value is left out
    # the stage-1 rate leaves the first point out (its run may have resumed mid-way): steps it added, not steps it ends at
    rate = scaling.stage1_seconds_per_step(pd.DataFrame({"steps": [480, 960, 1920], "seconds_pretrain": [500.0, 960.0, 2112.0]}))
    assert rate == pytest.approx((2.0 + 2.2) / 2) and scaling.stage1_seconds_per_step(pd.DataFrame({"steps": [480], "seconds_pretrain": [9.0]})) is None
    points = pd.DataFrame({"steps": [480, 960, 1920], "seconds_pretrain": [500.0, 960.0, 2112.0], "k_centers_mean": 55.0,
                           "lm_only_fidelity": 0.6, "dilm_fidelity": 0.6, "dilm_filtered_fidelity": 0.8,
                           "dilm_mean": [50.0, 51.0, 52.0], "dilm_filtered_mean": [55.5, 56.0, 56.5]})
    score, filtered = scaling.reading(points)[-2:]
    # 50 + 1 per doubling reaches 55 five doublings after 480 steps: 15,360 steps, x 2.1 s = 8.96 h
    assert "at about 15,360 steps" in score and "9.0 h on this machine at 2.10 s per LM step" in score
    # 55.5 - 0.5 per doubling before 480 steps: 240 steps, before the first point, so not "within" them
    assert "at every point measured (it meets K-centers at about 240 steps, before the first)" in filtered
    assert "within" not in filtered and "Crossing" not in filtered  # not a crossing ahead
    points["dilm_filtered_mean"] = [54.0, 55.0, 56.0]  # meets 55.0 at the middle point
    assert "from about 960 steps, within the points measured" in scaling.reading(points)[-1]


@pytest.mark.parametrize("precision, layers", [("fp32", "null"), ("bf16", "1")])
def test_a_stage_1_run_continued_from_its_state_is_the_longer_run(tiny_lm_dir, toy_data_dir, tmp_path, precision, layers):
    """Also with the top layer and the label rows training in fp32 while the frozen layers and
    the saved embedding are held in bf16 (the bench profiles)."""
    from dilm_ray.config import load_config
    from dilm_ray.data import load_data
    from dilm_ray.models.generator import build_generator
    from dilm_ray.train.pretrain import pretrain
    from dilm_ray.train.runtime import Runtime
    from dilm_ray.train.state import TrainState

    runtime = Runtime(precision=precision)

    def cfg_at(steps):  # constant lr after 1 warm-up step, as scaling.point_overrides makes it
        return load_config("configs/sst2-cpu.yaml", [f"data.path={toy_data_dir}", f"generator.model={tiny_lm_dir}", "generator.max_length=12",
                                                     f"generator.train_top_layers={layers}", "pretrain.batch_size=8", f"pretrain.steps={steps}",
                                                     "pretrain.scheduler=constant", f"pretrain.warmup_ratio={1.5 / steps}", "threads=1"])

    long_cfg, short_cfg = cfg_at(6), cfg_at(3)
    data = load_data(long_cfg, need_validation=False)
    torch.manual_seed(0)
    straight = build_generator(long_cfg.generator, data.task)
    pretrain(straight, data.train, long_cfg.pretrain, long_cfg.generator, long_cfg.seed, runtime)

    saved = {}

    def keep(st, metrics):  # what the Ray worker checkpoints after every step (state.pt)
        saved["state"] = TrainState(st.step, st.rng, st.optim, st.sched, dict(st.extra))

    torch.manual_seed(0)
    first = build_generator(short_cfg.generator, data.task)
    pretrain(first, data.train, short_cfg.pretrain, short_cfg.generator, short_cfg.seed, runtime, on_step=keep)
    first.save(tmp_path / "g")
    saved["state"].save(tmp_path / "state.pt")
    continued = build_generator(long_cfg.generator, data.task, str(tmp_path / "g"))
    end = pretrain(continued, data.train, long_cfg.pretrain, long_cfg.generator, long_cfg.seed, runtime, state=TrainState.load(tmp_path / "state.pt"))
    assert end.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), continued.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    if straight.label_rows is not None:  # the fp32 master rows, not their bf16 copy in the table
        torch.testing.assert_close(continued.label_rows, straight.label_rows, rtol=1e-6, atol=1e-7)
    moved = sum(float((a - b).abs().max()) for a, b in zip(straight.model.state_dict().values(), first.model.state_dict().values()))
    assert moved > 0  # steps 4-6 changed the weights: the comparison above is not vacuous


@pytest.mark.integration
@pytest.mark.slow  # 55 s: a benchmark's resume, not the product's (make test-slow)
def test_the_study_resumes_a_point_interrupted_in_its_evaluation(tiny_overrides, tmp_path, monkeypatch):
    import dilm_ray.pipeline.evaluate as evaluate
    from dilm_ray.config import load_config
    from dilm_ray.data import load_data
    from dilm_ray.evaluation.job import eval_key, protocol_config

    scaling = benchmark_script("scaling")
    overrides = [o for o in tiny_overrides if not o.startswith("synthesize.")] + ["synthesize.over_sample_ratio=2"]  # warm-up: int(3 x 0.05) = 0 steps
    cfg = load_config("configs/sst2-cpu.yaml", [*overrides, "synthesize.dpc=[2]", "evaluate.full_data_samples=null"])
    data = load_data(cfg)
    key = eval_key(protocol_config(cfg, "k_centers"), data.task, data.validation, cfg.learner.model)
    baseline = tmp_path / "baseline.csv"  # K-centers and random runs of a record, scored under the same key
    pd.DataFrame([{"learner": cfg.learner.model, "method": m, "dpc": 2, "set_index": i, "seed": 42, "score": s, "eval_key": key, "set_digest": "x"}
                  for m, s0 in (("k_centers", 0.6), ("random", 0.55)) for i, s in enumerate([s0, s0 + 0.02, s0 - 0.01])]).to_csv(baseline, index=False)
    record = tmp_path / "record"
    args = ["run", "configs/sst2-cpu.yaml", *overrides, "--points", "2,4", "--sets", "2", "--last-sets", "2", "--dpc", "2", "--per-label", "4",
            "--record", str(record), "--baseline", str(baseline)]
    real, calls = evaluate.run_job, []

    def interrupted_at_the_second_point(*a, **kw):  # point 2 has 4 runs: stop in point 4's second
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("SIGTERM")
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "run_job", interrupted_at_the_second_point)
        first = CliRunner().invoke(scaling.main, [*args, "evaluate.parallel=false"])
    assert first.exit_code != 0 and "interrupted" in first.output, first.output
    assert (record / "point2" / "point.json").is_file() and not (record / "point4" / "point.json").exists()
    assert "[pretrain] continuing" in first.output
    state = torch.load(tmp_path / "runs" / "t-scaling4" / "generator-lm" / "train_state.pt", weights_only=False)
    assert state["step"] == 4 and state["extra"]["continued_from"] == [2]  # point 4 continued point 2's run

    second = CliRunner().invoke(scaling.main, args)
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert "[point 2] done earlier" in second.output and "[pretrain] 4 steps done earlier" in second.output
    assert "[distill] done earlier" in second.output and "[synthesize_dilm] done earlier" in second.output
    assert "1 of 4 runs done earlier" in second.output  # the run finished before the interrupt is kept
    points = pd.read_csv(record / "points.csv")
    assert list(points.steps) == [2, 4] and list(points.dilm_runs) == [2, 2] and (points.k_centers_runs == 3).all()
    assert points.dilm_p_vs_k_centers.notna().all()
    assert len(pd.read_csv(record / "runs.csv")) == 8  # 2 points x 2 methods x 2 sets, none repeated
    assert (record / "scaling.png").stat().st_size > 0 and "per doubling of LM steps" in (record / "table.md").read_text()
    assert json.loads((record / "point4" / "fingerprint.json").read_text())["stages"]["pretrain"]["weights"]

    mismatched = baseline.read_text().replace(key, "0" * 16)
    baseline.write_text(mismatched)
    refused = CliRunner().invoke(scaling.main, [*args[:-4], "--points", "2,4,6", "--record", str(record), "--baseline", str(baseline)])
    assert refused.exit_code == 2 and "not comparable" in refused.output and "Traceback" not in refused.output
    assert "trained again" not in refused.output  # refused before any stage 1

    # a fresh clone: the record is there, the run folders are not; a new point first makes the
    # earlier points' generators again, in order, and checks each against its recorded digest
    baseline.write_text(mismatched.replace("0" * 16, key))
    shutil.rmtree(tmp_path / "runs")
    third = CliRunner().invoke(scaling.main, [*args[:-4], "--points", "2,4,6", "--record", str(record), "--baseline", str(baseline)])
    assert third.exit_code == 0, third.output + repr(third.exception)
    assert third.output.count("trained again") == 2 and third.output.count("equal to the record's") == 2, third.output
    row = json.loads((record / "point6" / "point.json").read_text())
    assert set(row["rebuilt"]) == {"2", "4"} and all(r["rebuilt"] == r["recorded"] for r in row["rebuilt"].values())
    assert row["rebuilt"]["4"]["rebuilt_metrics"] == row["rebuilt"]["4"]["recorded_metrics"] and "[pretrain 4]" in row["rebuilt"]["4"]["rebuilt_metrics"]
    state = torch.load(tmp_path / "runs" / "t-scaling6" / "generator-lm" / "train_state.pt", weights_only=False)
    assert state["step"] == 6 and state["extra"]["continued_from"] == [2, 4]
    assert list(pd.read_csv(record / "points.csv").steps) == [2, 4, 6]
