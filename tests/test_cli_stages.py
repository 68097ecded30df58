"""Each CLI stage on tiny models and toy data, in order, as a user would chain them
(stages 1-2 on Ray Train, evaluation on Ray tasks)."""

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from dilm_ray.cli import main



def _invoke(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.integration
def test_stages_chain_through_the_cli(tiny_overrides, tmp_path):
    cfg = ["configs/sst2-cpu.yaml", *tiny_overrides]
    assert "LM-only generator saved to" in _invoke(["pretrain", *cfg])
    assert "DiLM generator saved to" in _invoke(["distill", *cfg])
    assert "dpc=2: 2 sets under" in _invoke(["synthesize", *cfg])
    assert "label filter judged" in _invoke(["synthesize", *cfg, "--generator", "dilm_filtered"])
    _invoke(["synthesize", *cfg, "--generator", "lm_only"])
    _invoke(["coreset", *cfg, "--method", "random", "--method", "herding"])
    out = _invoke(["evaluate", *cfg])
    for method in ("dilm", "dilm_filtered", "lm_only", "random", "herding"):
        assert f"| {method} |" in out
    runs = pd.read_csv(tmp_path / "runs" / "t" / "results" / "runs.csv")
    assert len(runs) == 5 * 2  # 5 methods x (2 sets x 1 seed); herding's single set is run twice
    # every set folder is a dataset with a card: what made it and, once evaluated, its score
    import datasets

    from dilm_ray.data.card import read_card

    folder = tmp_path / "runs" / "t" / "distilled" / "dilm" / "dpc2" / "set0"
    card = read_card(folder)
    assert {k: card[k] for k in ("task", "method", "dpc", "set_index", "rows")} == {"task": "sst2", "method": "dilm", "dpc": 2, "set_index": 0, "rows": 4}
    assert card["generator"].endswith("-> generator-dilm") and card["label_names"] == ["negative", "positive"]
    score = runs[(runs.method == "dilm") & (runs["set_index"] == 0)]["score"]
    assert card["scores"] == {str(runs.learner[0]): {"mean": float(score.mean()), "runs": len(score)}}
    loaded = datasets.load_dataset(str(folder))["train"]
    assert loaded.features["label"].names == ["negative", "positive"] and len(loaded) == 4
    assert read_card(tmp_path / "runs" / "t" / "distilled" / "herding" / "dpc2" / "set0")["method"] == "herding"
    # the filtered DiLM sets are selected from the DiLM sets' own pools (one pool, two selections)
    filtered = tmp_path / "runs" / "t" / "distilled" / "dilm_filtered" / "dpc2" / "set0"
    assert (filtered / "pool.jsonl").read_text() == (folder / "pool.jsonl").read_text()
    import json

    def rows(path):
        return {json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines()}

    pool_rows = rows(folder / "pool.jsonl")
    assert rows(filtered / "train.jsonl") <= pool_rows and rows(folder / "train.jsonl") <= pool_rows
    assert 0 <= read_card(filtered)["label_filter_consistent"] <= 1 and read_card(filtered)["pool_rows"] == len(pool_rows)
    # label fidelity: the card's is the reference classifier's agreement on that set; the table
    # gives it per generated group and leaves coresets blank
    from dilm_ray.config import load_config
    from dilm_ray.data import load_data, load_file
    from dilm_ray.evaluation.fidelity import label_fidelity, reference_classifier

    data = load_data(load_config(cfg[0], cfg[1:]))
    reference = reference_classifier(data.train, 42)
    expected = label_fidelity(reference, [load_file(single := folder / "train.jsonl", data.task)], 2).overall
    assert card["label_fidelity"] == round(expected, 4)
    dilm_row = next(line for line in out.splitlines() if "| dilm |" in line)
    random_row = next(line for line in out.splitlines() if "| random |" in line)
    group = label_fidelity(reference, [load_file(p, data.task) for p in sorted(folder.parent.glob("set*/train.jsonl"))], 2)
    assert "label fidelity % (per label)" in out and dilm_row.split("|")[-2].strip() == group.text()
    assert random_row.split("|")[-2].strip() == ""
    assert "| train |" in _invoke(["evaluate", *cfg, "--data", str(single)])


def test_distill_without_pretraining_is_a_user_error(tiny_overrides):
    result = CliRunner().invoke(main, ["distill", "configs/sst2-cpu.yaml", *tiny_overrides, "name=fresh"])
    assert result.exit_code == 2 and "does not hold a generator checkpoint: run the earlier stage first" in result.output


@pytest.mark.integration
def test_mlflow_records_config_metrics_and_artifacts(tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["pretrain", "configs/sst2-cpu.yaml", *tiny_overrides, "tracking.enabled=true", f"tracking.uri={uri}", "pretrain.log_every=1"]
    _invoke(args)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["dilm-sst2"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.mlflow.runName"] == "t-pretrain" and run["status"] == "FINISHED"
    assert run["params.distill.inner_loop"] == "2" and run["params.generator.max_length"] == "12"
    history = mlflow.MlflowClient().get_metric_history(run["run_id"], "pretrain.lm_loss")
    assert [m.step for m in history] == [1, 2, 3]
    config_yaml = mlflow.artifacts.load_text(f"runs:/{run['run_id']}/config.yaml")
    assert "inner_loop: 2" in config_yaml


@pytest.mark.integration
def test_lora_generator_runs_stages_one_and_two_on_ray_and_synthesizes(tiny_overrides, tiny_lm_dir, tmp_path):
    """generator.lora_rank through Ray Train: both stages train adapters, their checkpoints
    are plain models of the base architecture (adapters merged) that synthesis loads."""
    from safetensors import safe_open

    import torch

    cfg = ["configs/sst2-cpu.yaml", *tiny_overrides, "generator.lora_rank=2", "precision=bf16"]
    _invoke(["pretrain", *cfg])
    _invoke(["distill", *cfg])
    run = tmp_path / "runs" / "t"
    name = "model.layers.0.self_attn.q_proj.weight"
    weights = []
    for folder in (tiny_lm_dir, run / "generator-lm", run / "generator-dilm"):
        with safe_open(folder / "model.safetensors", "pt") as f:
            keys = list(f.keys())
            weights.append(f.get_tensor(name).float())
        assert not any("lora_" in k or "base_layer" in k for k in keys)
    # each stage moved the lowest block by a rank-2 update (LoRA), not a full-rank one; in bf16 the
    # frozen weight it was added to is the bf16-held one
    for before, after in zip(weights, weights[1:]):
        assert torch.linalg.matrix_rank(after - before.bfloat16().float(), atol=1e-6) == 2
    assert "dpc=2: 2 sets under" in _invoke(["synthesize", *cfg])


@pytest.mark.integration
def test_a_generator_that_cannot_write_pairs_ends_stage_2_in_one_line(tiny_overrides, tmp_path):
    from tests.conftest import toy_glue

    # room for the sink, the label token, one token and EOS: never a premise, <sep> and a hypothesis
    data = toy_glue(tmp_path / "mnli", "mnli")
    cfg = ["configs/mnli-cpu.yaml", *tiny_overrides, f"data.path={data}", "generator.max_length=4", "name=short"]
    _invoke(["pretrain", *cfg])
    result = CliRunner().invoke(main, ["distill", *cfg])
    assert result.exit_code == 2, result.output + repr(result.exception)
    error = result.output.strip().splitlines()[-1]  # after the stage's progress bar
    assert error.startswith("error: stage distill: generator.max_length=4 leaves 1 tokens after the prompt")
    assert error.endswith("(raise generator.max_length)") and "Traceback" not in result.output
