"""benchmarks/label_fidelity.py on tiny models and toy data."""

import re

from click.testing import CliRunner

from tests.conftest import benchmark_script


def test_reference_classifier_reads_the_toy_labels(toy_sets):
    train, val = toy_sets
    predict = benchmark_script("label_fidelity").reference_classifier(train)
    assert (predict(val) == val.labels).mean() > 0.9


def test_fidelity_table_for_trained_and_given_generators(tiny_overrides, tiny_lm_dir):
    args = ["configs/sst2-cpu.yaml", *tiny_overrides, "--generator", str(tiny_lm_dir), "--init", "bos", "--steps", "2", "--per-label", "6"]
    result = CliRunner().invoke(benchmark_script("label_fidelity").main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = re.findall(r"^\| (.+?) \| (\S+) \| (\S+) \| ([\d.]+) \| negative: (\d+) / positive: (\d+) \|", result.stdout, re.M)
    assert [r[1] for r in rows] == ["-", "2"] and rows[1][0].endswith("label_init=bos"), result.output
    for *_, total, neg, pos in rows:
        assert abs(float(total) - (int(neg) + int(pos)) / 2) <= 1  # equal samples per label: the mean of both shares
