import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from dilm_ray.cli import main
from dilm_ray.config import DataConfig
from dilm_ray.data import load_split, resolve_task, subsample
from dilm_ray.errors import UserError


def _cfg(path, **kw):
    return DataConfig(task=kw.pop("task", "sst2"), path=str(path), **kw)


def test_local_folder_in_hub_layout(toy_data_dir):
    task = resolve_task(_cfg(toy_data_dir))
    train = load_split(_cfg(toy_data_dir), task, "train")
    assert len(train) == 200 and train.columns == ("sentence",)
    assert train.counts(2) == [100, 100]


def test_mnli_uses_validation_matched(toy_pair_dir):
    cfg = _cfg(toy_pair_dir, task="mnli")
    task = resolve_task(cfg)
    assert task.validation_split == "validation_matched" and task.is_pair
    val = load_split(cfg, task, task.validation_split)
    assert len(val) == 40 and len(val.texts[0]) == 2


def test_missing_split_file(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"")
    cfg = _cfg(tmp_path)
    with pytest.raises(UserError, match=r"no 'validation' split in .*: expected validation.parquet"):
        load_split(cfg, resolve_task(cfg), "validation")


def test_missing_path(tmp_path):
    cfg = _cfg(tmp_path / "nope")
    with pytest.raises(UserError, match=r"data.path .*nope does not exist"):
        load_split(cfg, resolve_task(cfg), "train")


def test_missing_column_names_it(tmp_path):
    pd.DataFrame({"text": ["a b"], "label": [0]}).to_parquet(tmp_path / "train.parquet")
    cfg = _cfg(tmp_path)
    with pytest.raises(UserError, match=r"train.parquet: missing column 'sentence' \(columns: text, label\)"):
        load_split(cfg, resolve_task(cfg), "train")


def test_empty_split(tmp_path):
    pd.DataFrame({"sentence": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}).to_parquet(tmp_path / "train.parquet")
    cfg = _cfg(tmp_path)
    with pytest.raises(UserError, match="the split is empty"):
        load_split(cfg, resolve_task(cfg), "train")


def test_empty_text_names_row(tmp_path):
    pd.DataFrame({"sentence": ["fine", "  ", "ok"], "label": [0, 1, 0]}).to_csv(tmp_path / "train.csv", index=False)
    cfg = _cfg(tmp_path)
    with pytest.raises(UserError, match=r"train.csv row 1: empty text in column 'sentence'"):
        load_split(cfg, resolve_task(cfg), "train")


def test_label_outside_label_set_names_file_and_row(tmp_path):
    pd.DataFrame({"sentence": ["a", "b", "c"], "label": [0, 1, 2]}).to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    cfg = _cfg(tmp_path)
    with pytest.raises(UserError, match=r"train.jsonl row 2: label 2 is outside the label set \(0/negative, 1/positive\)"):
        load_split(cfg, resolve_task(cfg), "train")


def test_custom_task_with_string_labels(tmp_path):
    pd.DataFrame({"q": ["x y", "z w"], "a": ["u", "v"], "tag": ["yes", "no"]}).to_csv(tmp_path / "train.csv", index=False)
    cfg = DataConfig(task="mine", path=str(tmp_path), text_columns=["q", "a"], label_column="tag", label_names=["no", "yes"])
    task = resolve_task(cfg)
    data = load_split(cfg, task, "train")
    assert data.labels.tolist() == [1, 0] and data.columns == ("q", "a")


def test_custom_task_needs_columns_and_labels(tmp_path):
    with pytest.raises(UserError, match="a custom task needs data.path, data.text_columns and data.label_names"):
        resolve_task(DataConfig(task="mine", path=str(tmp_path)))


def test_subsampling_is_deterministic_and_balanced(toy_data_dir):
    cfg = _cfg(toy_data_dir)
    train = load_split(cfg, resolve_task(cfg), "train")
    a = subsample(train, 30, seed=7, balanced=True, num_labels=2)
    b = subsample(train, 30, seed=7, balanced=True, num_labels=2)
    c = subsample(train, 30, seed=8, balanced=True, num_labels=2)
    assert a.texts == b.texts and a.texts != c.texts
    assert a.counts(2) == [15, 15]
    assert len(subsample(train, 31, seed=7, balanced=False, num_labels=2)) == 31
    assert subsample(train, None, 0, False, 2) is train


def test_textset_saves_loadable_parquet_and_jsonl(toy_data_dir, tmp_path):
    import datasets

    cfg = _cfg(toy_data_dir)
    part = load_split(cfg, resolve_task(cfg), "train").select(np.arange(5))
    parquet, jsonl = part.save(tmp_path / "set0")
    for path, fmt in ((parquet, "parquet"), (jsonl, "json")):
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        assert ds.column_names == ["sentence", "label"] and ds["sentence"] == [t[0] for t in part.texts]


def test_cli_validate_reports_counts(toy_data_dir):
    result = CliRunner().invoke(main, ["validate", "configs/sst2-cpu.yaml", f"data.path={toy_data_dir}", "data.max_train_samples=null"])
    assert result.exit_code == 0, result.output
    assert "# train: 200 rows (negative=100, positive=100)" in result.output
    assert "# validation: 60 rows" in result.output


def test_cli_validate_bad_column(tmp_path):
    pd.DataFrame({"text": ["a"], "label": [0]}).to_parquet(tmp_path / "train.parquet")
    result = CliRunner().invoke(main, ["validate", "configs/sst2-cpu.yaml", f"data.path={tmp_path}"])
    assert result.exit_code == 2 and "missing column 'sentence'" in result.output


def test_a_development_split_is_carved_from_train_rows_outside_the_train_rows(toy_data_dir):
    from dilm_ray.config import load_config
    from dilm_ray.data import load_data
    from dilm_ray.data.loading import subsample_indices

    base = [f"data.path={toy_data_dir}", "data.max_train_samples=100", "data.balanced=true"]
    plain = load_data(load_config(None, base))
    dev = load_data(load_config(None, [*base, "data.dev_samples=40"]))
    assert dev.train.digest() == plain.train.digest()  # the same train rows: stages are shared
    assert len(dev.validation) == 40
    full = load_data(load_config(None, [f"data.path={toy_data_dir}"]))
    train_rows = {(t, int(y)) for t, y in zip(dev.train.texts, dev.train.labels)}
    dev_rows = [(t, int(y)) for t, y in zip(dev.validation.texts, dev.validation.labels)]
    all_rows = {(t, int(y)) for t, y in zip(full.train.texts, full.train.labels)}
    assert all(r in all_rows for r in dev_rows)  # train-split rows ...
    assert dev.validation.digest() != plain.validation.digest()  # ... reported instead of the validation split
    # ... and none of them is a train row (compare by index: toy sentences can repeat)
    kept = set(subsample_indices(full.train, 100, 0, True, 2).tolist())
    rest = np.setdiff1d(np.arange(len(full.train)), sorted(kept))
    picked = np.sort(np.random.default_rng(1).choice(rest, size=40, replace=False))
    assert not kept & set(picked.tolist()) and full.train.select(picked).digest() == dev.validation.digest()
    with pytest.raises(UserError, match="data.dev_samples=101: only 100 train rows are left"):
        load_data(load_config(None, [*base, "data.dev_samples=101"]))
