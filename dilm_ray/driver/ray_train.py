"""Stages 1-2 on Ray Train: one ``TorchTrainer`` per stage, the same loops in every worker.

Workers share the generator through averaged gradients (gloo on CPU, nccl on GPU); each has
its own data shard, learner and synthetic pool (seeds offset by rank). Rank 0 checkpoints the
generator with the loop state, which holds every rank's RNG state (``rank_rngs``), at the first
step past each multiple of ``checkpoint_every`` (``crossed``); a restarted worker group
(``ray.max_failures``) or a new invocation with ``resume=True`` continues from the latest one.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dilm_ray import interrupts
from dilm_ray.config import Config
from dilm_ray.errors import UserError
from dilm_ray.layout import RunLayout

BAR_METRICS = ("lm_loss", "match_loss", "grad_sim")  # shown beside a stage's bar; every metric prints at log steps


def train_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point: rebuild everything from the config, resume if Ray hands a checkpoint.

    ``loop_config``: ``cfg`` (the config as a dict), ``stage`` (``pretrain`` or ``distill``),
    ``source`` (the generator folder to start from; None: ``generator.model``), ``run_id`` and
    ``tracking_uri`` (MLflow; None: no MLflow metrics), ``progress`` (a ``progress.ProgressBoard``
    actor that rank 0 tells its step and metrics, or None). Everything the worker prints goes to
    ``RunLayout.worker_log(stage, rank)``.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with worker_output(RunLayout(Config.model_validate(loop_config["cfg"]).run_dir).worker_log(loop_config["stage"], rank)):
        _train_worker(loop_config)


@contextmanager
def worker_output(path: Path) -> Iterator[None]:
    """Point this process's stdout and stderr (their file descriptors, so C++ and tqdm output
    too) at ``path``, appended to, and restore them afterwards. Where ``path`` cannot be
    written (a run folder that is not on this node), the output stays in Ray's worker log."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1)
    except OSError:
        yield
        return
    fds = sys.stdout.fileno(), sys.stderr.fileno()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    with log:
        for fd in fds:
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip(fds, saved):
                os.dup2(old, fd)
                os.close(old)


def _train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    from tqdm.auto import tqdm

    from dilm_ray.data import load_data
    from dilm_ray.models.generator import build_generator
    from dilm_ray.seeding import setup_torch
    from dilm_ray.driver.progress import BoardLogger
    from dilm_ray.tracking.loggers import ConsoleLogger, MLflowLogger, MultiLogger
    from dilm_ray.train.runtime import Runtime
    from dilm_ray.train.state import TrainState, crossed

    cfg = Config.model_validate(loop_config["cfg"])
    stage = loop_config["stage"]
    runtime = Runtime.from_environment(cfg.precision)
    # where each rank ran, for the user reading the log after a node was lost (and for the tests)
    # (tqdm.write, as the metric lines: a plain print reached the log twice in a Train worker)
    tqdm.write(f"[{stage}] rank {runtime.rank} of {runtime.world_size} on node {ray.get_runtime_context().get_node_id()} ({runtime.device})")
    setup_torch(cfg, runtime.rank)
    data = load_data(cfg, need_validation=False)
    local = Path(tempfile.mkdtemp(prefix=f"dilm-{stage}-"))
    state, source = None, loop_config.get("source")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(local / "resume"))
        state, source = TrainState.load(local / "resume" / "state.pt"), str(local / "resume" / "generator")
        state.extra.setdefault("resumed_from", []).append(state.step)
    elif loop_config.get("state"):  # a finished run continued to more steps, from its generator (``source``)
        state = TrainState.load(Path(loop_config["state"]))
        state.extra.setdefault("continued_from", []).append(state.step)
    gen = build_generator(cfg.generator, data.task, source)
    gen.model.to(runtime.device)
    if loop_config.get("tracking_uri"):
        import mlflow

        mlflow.set_tracking_uri(loop_config["tracking_uri"])
    progress = loop_config.get("progress") if runtime.is_main else None
    logger = MultiLogger(
        ConsoleLogger(stage, runtime.is_main), BoardLogger(progress, stage),
        MLflowLogger(stage, loop_config.get("run_id"), runtime.is_main, resumed=checkpoint is not None),
    )
    section = cfg.pretrain if stage == "pretrain" else cfg.distill
    # stage 2 calls back every inner_loop steps: checkpoint at the first call past each multiple
    previous = state.step if state is not None else 0

    def on_step(st: TrainState, metrics: dict[str, float]) -> None:
        nonlocal previous
        final = st.step == section.steps
        save = crossed(previous, st.step, section.checkpoint_every) or final
        previous = st.step
        if progress is not None:
            sent = progress.update.remote(st.step, {k: f"{v:.4g}" for k, v in metrics.items() if k in BAR_METRICS})
            if final:  # calls from one caller run in order: the last lines and step reach the board before the workers end
                try:
                    ray.get(sent, timeout=30)
                except (ray.exceptions.RayError, TimeoutError):  # the board only draws: never end the stage for it
                    pass
        if not (save or metrics):
            return
        report = {"step": st.step, **metrics}
        if save:  # every rank's RNG, so that each resumes its own draws (rank 0 alone saves the state)
            st.extra["rank_rngs"] = runtime.gather_objects(st.rng)
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
        from dilm_ray.train.distill import DistillInputs, distill
        from dilm_ray.train.embeddings import train_embeddings

        learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed + runtime.rank)
        learner.model.to(runtime.device)
        embeddings = train_embeddings(RunLayout(cfg.run_dir).cache, data.train, learner, cfg.precision)
        inputs = DistillInputs(data.train, cfg.distill, cfg.generator, cfg.seed, embeddings)
        distill(gen, learner, inputs, runtime=runtime, logger=logger, state=state, on_outer_loop=on_step)
    shutil.rmtree(local, ignore_errors=True)


def worker_user_error(err: BaseException) -> UserError | None:
    """The first ``UserError`` a Train worker raised, from Ray Train's ``WorkerGroupError``
    (its ``worker_failures`` by rank; Ray may wrap each in a ``RayTaskError`` that keeps the
    original as ``cause``); None when the failure is not the user's to fix."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        failure = failures[rank]
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, UserError):
            return cause
    return None


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (``s3://bucket/x``, ``gs://``, ``file://``), False for a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def storage_root(cfg: Config) -> Path | str:
    """Where Ray Train keeps the stages' checkpoints: ``ray.storage_path`` or ``<run>/ray``.

    A URI (``s3://bucket/x``, ``gs://``; see ``is_uri``) is returned unchanged, as a string, for
    Ray to open with ``pyarrow.fs``; a local path is expanded (``~``) and made absolute against
    the working folder, as a ``Path``.
    """
    if cfg.ray.storage_path and is_uri(cfg.ray.storage_path):
        return cfg.ray.storage_path
    return Path(cfg.ray.storage_path or RunLayout(cfg.run_dir).ray).expanduser().resolve()


def clear_storage(storage: Path | str, name: str) -> None:
    """Delete the Ray Train run ``name`` under ``storage`` (a ``storage_root``), if it exists.

    A URI is deleted through ``pyarrow.fs``, as Ray Train itself resolves storage URIs
    (``pyarrow.fs.FileSystem.from_uri``); its errors (credentials, network) propagate.
    """
    if isinstance(storage, Path):
        shutil.rmtree(storage / name, ignore_errors=True)
        return
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    path = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def fit_stage(
    cfg: Config, stage: str, source: str | None = None, resume: bool = False, run_id: str | None = None,
    tracking_uri: str | None = None, callbacks: list | None = None, state: str | None = None,
) -> Path:
    """Run ``stage`` (``pretrain`` or ``distill``) on ``cfg.ray.num_workers`` workers, starting
    from the generator folder ``source`` (None: ``generator.model``), and copy the final
    generator into the run folder (``RunLayout.generator(stage)``). With ``resume`` it continues
    from the stage's latest Ray checkpoint, if any; without, it starts clean.

    ``state``: the ``train_state.pt`` of a finished run of the same stage (beside its generator,
    given as ``source``), to continue that run to ``steps`` (a stage-1 scaling study: one
    generator evaluated at several step counts). Its step, RNG, optimizer and scheduler states
    carry on, so with a schedule that does not depend on the total steps (``constant`` after
    the same warm-up steps) the continued run is the longer run. A Ray checkpoint of this run,
    when resuming, takes precedence.

    Raises ``RuntimeError`` when the trainer ends without a checkpoint, and a worker's
    ``UserError`` (``GenerationError`` among them) as itself, its message prefixed by the stage,
    so the command ends in one line rather than Ray's traceback of the worker.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from dilm_ray.driver.progress import board, follow
    from dilm_ray.driver.ray_env import ensure_ray

    ensure_ray(cfg)
    storage, name = storage_root(cfg), f"{cfg.name}-{stage}"
    if not resume:  # the same name restores the earlier run's snapshot: start clean unless resuming
        clear_storage(storage, name)
    progress = board()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.to_dict(), "stage": stage, "source": source, "run_id": run_id, "tracking_uri": tracking_uri, "progress": progress,
            "state": state,
        },
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
    try:
        with follow(progress, stage, (cfg.pretrain if stage == "pretrain" else cfg.distill).steps), interrupts.ctrl_c_through("Ray Train"):
            result = trainer.fit()
    except TrainingFailedError as err:
        cause = worker_user_error(err)
        if cause is None:
            raise
        raise type(cause)(f"stage {stage}: {cause}") from None
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} finished without a checkpoint")
    out = RunLayout(cfg.run_dir).generator(stage)
    with tempfile.TemporaryDirectory() as tmp:
        result.checkpoint.to_directory(tmp)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(Path(tmp) / "generator", out)
        shutil.copy(Path(tmp) / "state.pt", out / "train_state.pt")
    return out
