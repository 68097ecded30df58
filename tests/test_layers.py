"""The layer contract of pyproject.toml ([tool.importlinter]), checked by import-linter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=cwd, capture_output=True, text=True, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_every_layer_imports_only_layers_below_it_and_no_cycle_exists():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def _lint_with_import(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """import-linter on a copy of the package where ``module`` (a path under dilm_ray/) also has ``line``."""
    shutil.copytree(ROOT / "dilm_ray", tmp_path / "dilm_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "dilm_ray" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    return _lint(tmp_path)


def test_the_contract_fails_on_an_upward_import(tmp_path):
    """A copy of the package where a training loop reaches up into the pipeline must break the contract."""
    result = _lint_with_import(tmp_path, "train/pretrain.py", "from dilm_ray.pipeline.table import STAGES")
    assert result.returncode != 0
    assert "dilm_ray.train.pretrain -> dilm_ray.pipeline.table" in result.stdout


def test_a_stage_module_importing_another_stage_breaks_the_pipeline_contract(tmp_path):
    """Stage modules build on ``pipeline.base`` only: one reaching into another stage (or the table) must fail."""
    result = _lint_with_import(tmp_path, "pipeline/synthesize.py", "from dilm_ray.pipeline.coreset import wanted")
    assert result.returncode != 0
    assert "dilm_ray.pipeline.synthesize -> dilm_ray.pipeline.coreset" in result.stdout
