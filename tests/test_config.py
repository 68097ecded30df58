from pathlib import Path

import pytest
from click.testing import CliRunner

from dilm_ray.cli import main
from dilm_ray.config import Config, load_config, parse_override
from dilm_ray.errors import UserError

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg


def test_shipped_configs_cover_the_paper_tasks():
    names = {p.stem for p in CONFIGS}
    assert {"sst2", "mnli", "qqp", "sst2-cpu", "mnli-cpu", "qqp-cpu"} <= names
    assert load_config(Path("configs/mnli.yaml")).generator.model == "gpt2"


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["distill.lr=3e-7", "synthesize.dpc=[5, 10]", "data.balanced=true", "data.max_train_samples=null"])
    assert cfg.distill.lr == pytest.approx(3e-7)
    assert cfg.synthesize.dpc == [5, 10]
    assert cfg.data.balanced is True and cfg.data.max_train_samples is None


def test_a_config_keeps_the_file_and_overrides_it_was_loaded_with():
    """Records name the command that made them (``pipeline.record.fingerprint``)."""
    cfg = load_config("configs/sst2-cpu.yaml", ["seed=43", "name=sst2-cpu-seed43"])
    assert cfg.config_file == "configs/sst2-cpu.yaml" and cfg.overrides == ("seed=43", "name=sst2-cpu-seed43")
    assert cfg.model_copy(update={"seed": 1}).overrides == cfg.overrides  # copies keep them
    assert load_config(None).config_file is None and load_config(None).overrides == ()
    assert Config.model_validate(cfg.to_dict()).overrides == ()  # rebuilt from values: no command


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.inner_loop=-1", "config key 'distill.inner_loop' = -1: Input should be greater than or equal to 1"),
        ("distill.bogus=1", "unknown config key 'distill.bogus'"),
        ("bogus.lr=1", "unknown config key 'bogus.lr'"),
        ("distill.lr=fast", "config key 'distill.lr' = 'fast'"),
        ("evaluate.scheduler=cyclic", "config key 'evaluate.scheduler' = 'cyclic'"),
        ("distill.steps=7", "distill.steps=7 must be a multiple of distill.inner_loop=10"),
        ("novalue", "override 'novalue': expected KEY=VALUE"),
    ],
)
def test_bad_values_are_refused_with_the_key_path(override, expected):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  lr: 1.0e-5\n  inner_loops: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'distill.inner_loops' in .*bad.yaml"):
        load_config(bad)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=3e-7")[1] == pytest.approx(3e-7)
    assert parse_override("a.b=gpt2") == ("a.b", "gpt2")


def test_cli_prints_one_line_and_exits_2_on_bad_override():
    result = CliRunner().invoke(main, ["validate", "configs/mnli.yaml", "distill.inner_loop=-1"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith("error: config key 'distill.inner_loop' = -1")


def test_cli_missing_config_file():
    result = CliRunner().invoke(main, ["validate", "configs/nope.yaml"])
    assert result.exit_code == 2 and "config file not found: configs/nope.yaml" in result.output


def test_run_name_must_be_short_and_stable():
    with pytest.raises(UserError, match="config key 'name'"):
        load_config(None, ["name=a run with spaces"])
    assert Config().run_dir == Path("runs/dilm")
