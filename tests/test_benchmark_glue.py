"""benchmarks/glue.py on tiny models: one pass writes the tables; a second pass resumes and
repeats nothing."""

import io

import pandas as pd
import pytest
from click.testing import CliRunner

from tests.conftest import benchmark_script

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shutdown_ray_after")]


def test_benchmark_writes_tables_and_resumes_without_repeating(tiny_overrides, tmp_path):
    bench = benchmark_script("glue")
    args = ["configs/bench/sst2.yaml", *tiny_overrides, "--budget", "smoke"]
    first = CliRunner().invoke(bench.main, args)
    assert first.exit_code == 0, first.output + repr(first.exception)
    out = tmp_path / "runs" / "t" / "bench-smoke"
    runs = pd.read_csv(out / "runs.csv")
    # 5 methods x DPC 2 x (2 sets x 1 seed); herding's single set is trained with 2 seeds
    assert len(runs) == 10 and set(runs.method) == {"dilm", "lm_only", "random", "k_centers", "herding"}
    table = (out / "table.md").read_text()
    assert "| p vs k_centers | p vs random |" in table and "| pretrain |" in table

    lost = next((tmp_path / "runs" / "t" / "distilled" / "dilm").glob("dpc*/set1/train.parquet"))
    kept = lost.parent.parent / "set0" / "train.parquet"
    lost_text, kept_mtime = lost.read_bytes(), kept.stat().st_mtime_ns
    lost.unlink()  # an interrupted synthesis: only the missing set is made again, identically

    second = CliRunner().invoke(bench.main, args)
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert "[pretrain] done earlier" in second.output and "[coreset] done earlier" in second.output
    assert "1 sets made, 1 kept" in second.output and kept.stat().st_mtime_ns == kept_mtime
    assert pd.read_parquet(lost).equals(pd.read_parquet(io.BytesIO(lost_text)))
    assert "10 of 10 runs done earlier" in second.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), runs)


def test_benchmark_reports_a_bad_override_in_one_line(tiny_overrides):
    result = CliRunner().invoke(benchmark_script("glue").main, ["configs/bench/sst2.yaml", *tiny_overrides, "distill.bogus=1"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
