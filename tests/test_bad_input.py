"""Data files with no rows end a command in one line naming the file, exit status 2 (issue 31, item 10)."""

import pytest
from click.testing import CliRunner

from dilm_ray.cli import main


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def _file(name: str, text: str):
    def make(root):
        (root / name).write_text(text)
        return root / name, root / name  # given to --data, named in the error

    return make


def _empty_folder(root):
    for name in ("sets/a/set_0.jsonl", "sets/a/set_1.jsonl", "sets/b/set_0.csv"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root / "sets", root / "sets" / "a" / "set_0.jsonl"  # the first file read


CASES = {
    "empty jsonl": (_file("empty.jsonl", ""), "the file is empty"),
    "header-only csv": (_file("head.csv", "sentence,label\n"), "the file has a header but no rows"),
    "folder of empty files": (_empty_folder, "the file is empty"),
    "blank json": (_file("blank.json", "\n  \n"), "the file is empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_data_without_rows_is_one_line_naming_the_file(case, tiny_overrides, tmp_path):
    make, why = CASES[case]
    given, named = make(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", "configs/sst2-cpu.yaml", *tiny_overrides, "evaluate.parallel=false",
                                       "--learner", "tfidf-logreg", "--data", str(given)])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert _error_lines(result) == [f"error: {named}: {why}"]


def test_an_empty_train_split_under_data_path_is_one_line(tmp_path, tiny_overrides):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    result = CliRunner().invoke(main, ["validate", "configs/sst2-cpu.yaml", *tiny_overrides, f"data.path={tmp_path / 'data'}"])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert _error_lines(result)[-1] == f"error: {tmp_path / 'data' / 'train.jsonl'}: the file is empty"
