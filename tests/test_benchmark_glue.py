"""benchmarks/glue.py on tiny models: a pass interrupted during evaluation keeps its finished
runs; the next pass resumes, repeats nothing and writes the tables; on a fresh machine the
record alone resumes it, without training a generator."""

import json
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from tests.conftest import benchmark_script

KEY = ["learner", "method", "dpc", "set_index", "seed"]

pytestmark = pytest.mark.integration


def test_benchmark_writes_tables_and_resumes_without_repeating(tiny_overrides, tmp_path, monkeypatch):
    import dilm_ray.pipeline.evaluate as pipeline

    bench = benchmark_script("glue")
    # the bench config's full-data row is left out: its resume is tests/test_full_data.py's
    args = ["configs/bench/sst2.yaml", *tiny_overrides, "evaluate.full_data_samples=null", "--budget", "smoke", "--record", str(tmp_path / "record")]
    run_dir, record = tmp_path / "runs" / "t-smoke", tmp_path / "record" / "t-smoke"
    out = record / "bench-smoke"
    real_run_job, calls = pipeline.run_job, []

    def dies_at_fourth_run(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        return real_run_job(*a, **kw)

    with monkeypatch.context() as patch:  # interrupted during evaluation: finished runs are on disk
        patch.setattr(pipeline, "run_job", dies_at_fourth_run)
        first = CliRunner().invoke(bench.main, [*args, "evaluate.parallel=false"])
    assert first.exit_code != 0
    interrupted = pd.read_csv(out / "runs.csv")
    assert len(interrupted) == 3

    lost = next((run_dir / "distilled" / "dilm").glob("dpc*/set1/train.jsonl"))
    kept = lost.parent.parent / "set0" / "train.jsonl"
    lost_text, kept_mtime = lost.read_bytes(), kept.stat().st_mtime_ns
    lost.unlink()  # an interrupted synthesis: only the missing set is made again, identically
    (record / lost.relative_to(run_dir)).unlink()

    second = CliRunner().invoke(bench.main, args)
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert "[pretrain] done earlier" in second.output and "[coreset] done earlier" in second.output
    assert "1 sets made, 1 kept" in second.output and kept.stat().st_mtime_ns == kept_mtime
    assert lost.read_bytes() == lost_text
    assert "3 of 10 runs done earlier" in second.output and "evaluation runs this invocation: 7" in second.output
    runs = pd.read_csv(out / "runs.csv")
    # 5 methods x DPC 2 x (2 sets x 1 seed); herding's single set is trained with 2 seeds
    assert len(runs) == 10 and set(runs.method) == {"dilm", "lm_only", "random", "k_centers", "herding"}
    assert len(runs.drop_duplicates(KEY)) == 10
    pd.testing.assert_frame_equal(runs.head(3), interrupted)  # kept, not repeated
    table = (out / "table.md").read_text()
    assert "| p vs k_centers | p vs random |" in table and "| pretrain |" in table
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [p["added_runs"] for p in provenance] == [7] and provenance[0]["config"]["name"] == "t-smoke"
    # the record holds every set as JSON lines: generated text, and coresets as train row indices
    assert not list(record.rglob("*.parquet"))
    assert len(list(record.glob("distilled/dilm/dpc*/set*/train.jsonl"))) == 2
    assert len(list(record.glob("distilled/k_centers/dpc*/set*/rows.jsonl"))) == 2
    assert not list(record.glob("distilled/k_centers/**/train.jsonl"))

    timing = json.loads((record / "timing.json").read_text())
    shutil.rmtree(run_dir)  # a fresh machine: only the record is left
    third = CliRunner().invoke(bench.main, args)
    assert third.exit_code == 0, third.output + repr(third.exception)
    assert "[record] 9 sets restored" in third.output  # herding has one set
    for stage in ("synthesize_dilm", "synthesize_lm_only", "coreset"):
        assert f"[{stage}] done earlier" in third.output
    for stage in ("pretrain", "distill"):
        assert f"[{stage}] not needed: the sets it feeds exist" in third.output
    assert json.loads((record / "timing.json").read_text())["runs"] == timing["runs"]  # no stage, no evaluation ran
    assert not (run_dir / "generator-lm").exists() and not (run_dir / "generator-dilm").exists()
    assert "10 of 10 runs done earlier" in third.output and "evaluation runs this invocation: 0" in third.output
    assert (run_dir / lost.relative_to(run_dir)).read_bytes() == (record / lost.relative_to(run_dir)).read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), runs)

    digests = json.loads((record / "coresets.json").read_text())  # the rebuilt coresets matched
    assert len(digests) == 5 and all(k.startswith("distilled/") for k in digests)
    key = next(k for k in digests if k.startswith("distilled/k_centers/") and "/set1/" in k)
    digests[key] = "0" * 64  # as if the recorded runs had been trained on another set
    (record / "coresets.json").write_text(json.dumps(digests))
    shutil.rmtree(run_dir)
    fourth = CliRunner().invoke(bench.main, args)
    last = fourth.output.strip().splitlines()[-1]
    assert fourth.exit_code == 2 and "Traceback" not in fourth.output and last.startswith("error: ")
    assert "differs from the set recorded" in last and key in last


@pytest.mark.slow  # 27 s; the benchmark's resume stays in make test
def test_benchmark_makes_only_the_sets_of_the_requested_methods(tiny_overrides, tmp_path):
    base = ["configs/bench/sst2.yaml", *tiny_overrides, "evaluate.full_data_samples=null", "--budget", "smoke"]  # sets only, no full-data row
    result = CliRunner().invoke(benchmark_script("glue").main, [*base, "--method", "dilm", "--method", "random"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "[synthesize_lm_only]" not in result.output
    distilled = tmp_path / "runs" / "t-smoke" / "distilled"
    assert sorted(p.name for p in distilled.iterdir() if p.is_dir()) == ["dilm", "random"]
    out = tmp_path / "runs" / "t-smoke" / "bench-smoke"
    assert set(pd.read_csv(out / "runs.csv").method) == {"dilm", "random"}

    # another selection at the same DPC adds to the folder: its tables keep the earlier runs
    again = CliRunner().invoke(benchmark_script("glue").main, [*base, "--method", "random"])
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "2 of 2 runs done earlier" in again.output
    assert set(pd.read_csv(out / "table.csv").method) == {"dilm", "random"}
    table = (out / "table.md").read_text()
    assert "--method dilm --method random\n" in table and table.count("python benchmarks/glue.py") == 2


def test_benchmark_reports_a_bad_override_in_one_line(tiny_overrides):
    result = CliRunner().invoke(benchmark_script("glue").main, ["configs/bench/sst2.yaml", *tiny_overrides, "distill.bogus=1"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
