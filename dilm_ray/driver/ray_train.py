"""Stages 1-2 on Ray Train: one ``TorchTrainer`` per stage, the same loops in every worker.

Workers share the generator through averaged gradients (gloo on CPU, nccl on GPU); each has
its own data shard, learner and synthetic pool (seeds offset by rank). Rank 0 checkpoints the
generator with the loop state every ``checkpoint_every`` steps; a restarted worker group
(``ray.max_failures``) or a new invocation with ``resume=True`` continues from the latest one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from dilm_ray.config import Config
from dilm_ray.layout import RunLayout

STAGES = ("pretrain", "distill")


def train_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point: rebuild everything from the config, resume if Ray hands a checkpoint.

    ``loop_config``: ``cfg`` (the config as a dict), ``stage`` (``pretrain`` or ``distill``),
    ``source`` (the generator folder to start from; None: ``generator.model``), ``run_id`` and
    ``tracking_uri`` (MLflow; None: no MLflow metrics).
    """
    import ray.train

    from dilm_ray.data import load_data
    from dilm_ray.models.generator import build_generator
    from dilm_ray.seeding import setup_torch
    from dilm_ray.tracking.loggers import ConsoleLogger, MLflowLogger, MultiLogger
    from dilm_ray.train.runtime import Runtime
    from dilm_ray.train.state import TrainState

    cfg = Config.model_validate(loop_config["cfg"])
    stage = loop_config["stage"]
    runtime = Runtime.from_environment(cfg.precision)
    setup_torch(cfg, runtime.rank)
    data = load_data(cfg, need_validation=False)
    local = Path(tempfile.mkdtemp(prefix=f"dilm-{stage}-"))
    state, source = None, loop_config.get("source")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(local / "resume"))
        state, source = TrainState.load(local / "resume" / "state.pt"), str(local / "resume" / "generator")
        state.extra.setdefault("resumed_from", []).append(state.step)
    gen = build_generator(cfg.generator, data.task, source)
    gen.model.to(runtime.device)
    if loop_config.get("tracking_uri"):
        import mlflow

        mlflow.set_tracking_uri(loop_config["tracking_uri"])
    logger = MultiLogger(ConsoleLogger(stage, runtime.is_main), MLflowLogger(stage, loop_config.get("run_id"), runtime.is_main))
    section = cfg.pretrain if stage == "pretrain" else cfg.distill

    def on_step(st: TrainState, metrics: dict[str, float]) -> None:
        final = st.step == section.steps
        save = st.step % section.checkpoint_every == 0 or final
        if not (save or metrics):
            return
        report = {"step": st.step, **metrics}
        if save and runtime.is_main:
            out = Path(tempfile.mkdtemp(prefix="ckpt-", dir=local))
            gen.save(out / "generator")
            st.save(out / "state.pt")
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
            shutil.rmtree(out, ignore_errors=True)
        else:
            ray.train.report(report)

    if stage == "pretrain":
        from dilm_ray.train.pretrain import pretrain

        pretrain(gen, data.train, cfg.pretrain, cfg.generator, cfg.seed, runtime, logger, state, on_step)
    else:
        from dilm_ray.models.learner import build_learner
        from dilm_ray.train.distill import distill
        from dilm_ray.train.embeddings import train_embeddings

        learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed + runtime.rank)
        learner.model.to(runtime.device)
        embeddings = train_embeddings(RunLayout(cfg.run_dir).cache, data.train, learner, cfg.precision)
        distill(gen, learner, data.train, cfg.distill, cfg.generator, cfg.seed, runtime, logger, state, on_step, embeddings)
    shutil.rmtree(local, ignore_errors=True)


def storage_root(cfg: Config) -> Path:
    """Where Ray Train keeps the stages' checkpoints: ``ray.storage_path`` or ``<run>/ray``."""
    return Path(cfg.ray.storage_path or RunLayout(cfg.run_dir).ray).expanduser().resolve()


def fit_stage(
    cfg: Config, stage: str, source: str | None = None, resume: bool = False, run_id: str | None = None,
    tracking_uri: str | None = None, callbacks: list | None = None,
) -> Path:
    """Run ``stage`` (``pretrain`` or ``distill``) on ``cfg.ray.num_workers`` workers, starting
    from the generator folder ``source`` (None: ``generator.model``), and copy the final
    generator into the run folder (``RunLayout.generator(stage)``). With ``resume`` it continues
    from the stage's latest Ray checkpoint, if any; without, it starts clean.

    Raises ``RuntimeError`` when the trainer ends without a checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dilm_ray.driver.ray_env import ensure_ray

    ensure_ray(cfg)
    storage, name = storage_root(cfg), f"{cfg.name}-{stage}"
    if not resume:  # the same name restores the earlier run's snapshot: start clean unless resuming
        shutil.rmtree(storage / name, ignore_errors=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "stage": stage, "source": source, "run_id": run_id, "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} finished without a checkpoint")
    out = RunLayout(cfg.run_dir).generator(stage)
    with tempfile.TemporaryDirectory() as tmp:
        result.checkpoint.to_directory(tmp)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(Path(tmp) / "generator", out)
        shutil.copy(Path(tmp) / "state.pt", out / "train_state.pt")
    return out
