import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dilm_ray.evaluation.plots import accuracy_figure, accuracy_vs_dpc, curves_figure, training_curves
from dilm_ray.evaluation.report import results_table


def _runs() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for learner in ("minilm-l6", "tfidf-logreg"):
        for dpc in (5, 10, 20):
            for method in ("dilm", "random", "herding"):
                for seed in range(3):
                    rows.append({"learner": learner, "dpc": dpc, "method": method, "set": 0, "seed": seed,
                                 "score": 0.6 + 0.01 * dpc + rng.normal(0, 0.02), "seconds": 1.0})
    return pd.DataFrame(rows)


def _png_ok(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_accuracy_vs_dpc_from_results_table(tmp_path):
    table = results_table(_runs())
    fig = accuracy_figure(table, "accuracy")
    assert len(fig.axes) == 2  # one subplot per learner
    ax = next(a for a in fig.axes if a.get_title() == "minilm-l6")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "10", "20"]
    assert len(ax.lines) >= 3 and "accuracy" in ax.get_ylabel()
    # dilm is drawn thicker than the baselines
    widths = {c.get_label(): c.lines[0].get_linewidth() for c in ax.containers}
    assert widths["dilm"] > max(w for m, w in widths.items() if m != "dilm")
    # plotted means are percentages of the table's means
    dilm = table[(table.learner == "minilm-l6") & (table.method == "dilm")].sort_values("dpc")
    line = next(c for c in ax.containers if c.get_label() == "dilm").lines[0]
    assert np.allclose(line.get_ydata(), 100 * dilm["mean"].to_numpy())
    assert accuracy_figure(table, "mean of accuracy and F1").axes[0].get_ylabel() == "mean of accuracy and F1 (%)"
    path = accuracy_vs_dpc(table, tmp_path / "sub" / "acc.png", "accuracy")
    assert path == tmp_path / "sub" / "acc.png"
    _png_ok(path)


def test_accuracy_vs_dpc_many_learners_and_bad_input(tmp_path):
    runs = pd.concat([_runs().assign(learner=f"l{i}") for i in range(4)])
    assert len(accuracy_figure(results_table(runs), "accuracy").axes) == 4  # 2x3 grid with the unused cells removed
    with pytest.raises(ValueError):
        accuracy_figure(pd.DataFrame(columns=["learner", "dpc", "method", "mean", "std", "runs"]), "accuracy")
    with pytest.raises(ValueError):
        accuracy_figure(pd.DataFrame({"learner": ["a"]}), "accuracy")


def test_training_curves(tmp_path):
    history = {
        "distill.grad_sim": [(s, 0.1 + s / 1000) for s in range(0, 500, 5)],
        "distill.match_loss": [(s, 1.0 / (1 + s)) for s in range(10)],
        "pretrain.lm_loss": [(0, 4.0), (10, 3.5), (20, float("nan")), (30, 3.0)],
        "empty": [],
    }
    fig = curves_figure(history, "run t")
    assert len(fig.axes) == 4
    assert [a.get_title() for a in fig.axes] == list(history)
    assert fig.axes[2].lines[0].get_xdata().tolist() == [0, 10, 30]  # non-finite values are skipped
    path = training_curves(history, tmp_path / "curves.png", "run t")
    width, height = _png_ok(path)
    assert width > height
    with pytest.raises(ValueError):
        curves_figure({}, "nothing")
