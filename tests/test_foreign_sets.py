"""Distilled sets from elsewhere: the DiLM authors' released layout, column mappings, DPC from the set."""

import json

import pytest
from click.testing import CliRunner

from dilm_ray.cli import main
from dilm_ray.pipeline.evaluate import load_any
from dilm_ray.data import BUILTIN_TASKS, load_file
from dilm_ray.errors import UserError

SST2 = BUILTIN_TASKS["sst2"]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _released(root, dpc, run, n_sets, per_label=None):
    """``sst2/dilm.dc/dpc_<D>.<run>/dataset/dataset_<i>.json``: JSON lines, columns sentence and labels."""
    folder = root / "sst2" / "dilm.dc" / f"dpc_{dpc}.{run}" / "dataset"
    for i in range(n_sets):
        counts = per_label or [dpc, dpc]
        rows = [{"sentence": f"{'great fun' if y else 'dull and bad'} {i} {k}", "labels": y} for y, n in enumerate(counts) for k in range(n)]
        _jsonl(folder / f"dataset_{i}.json", rows)
    return folder


def test_the_released_layout_groups_by_folder_and_reads_dpc_from_each_set(tmp_path):
    _released(tmp_path, 5, "gpt2_lr3e-7_gm_syn64_real100x2", 2)
    _released(tmp_path, 10, "gpt2_lr3e-7_gm_syn64_real100x2", 3)
    notes = []
    groups = load_any(tmp_path, SST2, log=notes.append)
    assert sorted(groups) == [
        ("sst2/dilm.dc/dpc_10.gpt2_lr3e-7_gm_syn64_real100x2/dataset", 10),
        ("sst2/dilm.dc/dpc_5.gpt2_lr3e-7_gm_syn64_real100x2/dataset", 5),
    ]  # both folders are called dataset: their paths keep them apart
    ten = groups[("sst2/dilm.dc/dpc_10.gpt2_lr3e-7_gm_syn64_real100x2/dataset", 10)]
    assert [s.path.name for s in ten] == ["dataset_0.json", "dataset_1.json", "dataset_2.json"]
    assert ten[0].data.counts(2) == [10, 10]  # labels read from the 'labels' column
    assert len({s.digest for s in ten}) == 3


def test_unequal_classes_are_reported_with_the_dpc_used(tmp_path):
    _released(tmp_path, 10, "run", 1, per_label=[10, 8])
    notes = []
    groups = load_any(tmp_path, SST2, log=notes.append)
    assert list(groups) == [("sst2/dilm.dc/dpc_10.run/dataset", 9)]
    assert any("unequal classes (10/8 rows per label): reported as DPC 9" in n for n in notes)


def test_a_column_mapping_applies_to_the_sets(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("text,y\nsuch a great film,1\nawful,0\n")
    data = load_file(path, SST2, {"sentence": "text", "label": "y"})
    assert data.texts == (("such a great film",), ("awful",)) and data.labels.tolist() == [1, 0]
    with pytest.raises(UserError, match=r"mine.csv: --columns label=tag: no column 'tag' \(columns: text, y\)"):
        load_file(path, SST2, {"sentence": "text", "label": "tag"})
    with pytest.raises(UserError, match="missing column 'sentence'"):
        load_file(path, SST2, {"label": "y"})


def test_evaluate_takes_the_released_tree_in_one_command(tiny_overrides, tmp_path):
    _released(tmp_path / "released", 2, "runA", 2)
    _released(tmp_path / "released", 4, "runB", 2)
    args = ["evaluate", "configs/sst2-cpu.yaml", *tiny_overrides, "evaluate.parallel=false", "--learner", "tfidf-logreg",
            "--data", str(tmp_path / "released"), "--columns", "label=labels"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = [line for line in result.output.splitlines() if line.startswith("| tfidf-logreg")]
    assert [line.split(" | ")[1:3] for line in table] == [["2", "sst2/dilm.dc/dpc_2.runA/dataset"], ["4", "sst2/dilm.dc/dpc_4.runB/dataset"]]
    assert "p vs sst2/dilm.dc/dpc_2.runA/dataset" in result.output  # the first group is the default reference
    bad = CliRunner().invoke(main, [*args, "--reference", "dilm"])
    assert bad.exit_code == 2 and "--reference dilm: no such method" in bad.output


def test_resumed_evaluation_drops_rows_scored_on_other_validation_rows(tiny_overrides, tmp_path):
    _released(tmp_path / "released", 2, "runA", 2)
    base = ["evaluate", "configs/sst2-cpu.yaml", *tiny_overrides, "evaluate.parallel=false", "--learner", "tfidf-logreg",
            "--data", str(tmp_path / "released"), "--columns", "label=labels"]
    first = CliRunner().invoke(main, [*base, "synthesize.n_datasets=2"])
    assert first.exit_code == 0, first.output
    # fewer sets and other validation rows: set 1's earlier row is not a job now, and was scored on other rows
    again = CliRunner().invoke(main, [*base, "synthesize.n_datasets=1", "data.max_validation_samples=20", "--resume"])
    assert again.exit_code == 0, again.output
    assert "0 of 1 runs done earlier, 2 stale rows dropped" in again.output
    table = [line for line in again.output.splitlines() if line.startswith("| tfidf-logreg")]
    assert [line.split(" | ")[4] for line in table] == ["1"]  # one run: the new one, not the new one beside an old one
    kept = CliRunner().invoke(main, [*base, "synthesize.n_datasets=1", "data.max_validation_samples=20", "--resume"])
    assert "1 of 1 runs done earlier" in kept.output and "stale" not in kept.output
