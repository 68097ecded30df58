"""Evaluation runs become MLflow child runs of the command's run."""

import mlflow
import pandas as pd

from dilm_ray.tracking.mlflow_store import log_evaluation_runs


def test_each_evaluation_run_is_a_child_run_with_its_identity_and_scores(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("dilm-test")
    runs = pd.DataFrame(
        [
            {"learner": "minilm-l6", "family": "encoder", "method": "dilm", "dpc": 10, "set_index": 0, "seed": 42, "accuracy": 0.7, "score": 0.7, "seconds": 3.0},
            {"learner": "tfidf-logreg", "family": "tfidf-logreg", "method": "random", "dpc": 10, "set_index": 1, "seed": 43, "accuracy": 0.6, "score": 0.6, "seconds": 0.1},
        ]
    )
    with mlflow.start_run() as parent:
        log_evaluation_runs(parent.info.run_id, runs.to_dict("records"))
    children = mlflow.search_runs(experiment_names=["dilm-test"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and set(children["status"]) == {"FINISHED"}
    tfidf = children[children["params.learner"] == "tfidf-logreg"].iloc[0]
    assert tfidf["params.method"] == "random" and tfidf["params.seed"] == "43" and tfidf["metrics.accuracy"] == 0.6
    assert tfidf["tags.mlflow.runName"] == "eval-tfidf-logreg-random-dpc10-set1-seed43"

