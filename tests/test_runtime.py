"""Collectives: on the runtime's device, bucketed, metrics reduced at log steps only, and the
bucketed gradient sync equal element by element to a per-tensor all-reduce over 2 gloo workers."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dilm_ray.config import DistillConfig, GeneratorConfig, LearnerConfig, PretrainConfig
from dilm_ray.train.runtime import Runtime


class Recorder:
    """A recording ``all_reduce``: keeps (device, dtype, numel) of every call and sums as if every
    one of ``world`` workers held the same tensor."""

    def __init__(self, world: int = 2):
        self.world, self.calls = world, []

    def __call__(self, tensor: torch.Tensor, async_op: bool = False):
        self.calls.append((tensor.device, tensor.dtype, tensor.numel()))
        if tensor.device.type != "meta":
            tensor.mul_(self.world)
        return _Done() if async_op else None


class _Done:
    def wait(self) -> None:
        pass


class Seen(Exception):
    pass


def test_metric_means_are_reduced_on_the_runtime_device():
    """NCCL rejects CPU tensors: the float64 vector of metrics must be built on ``device``."""

    def stop(tensor, async_op=False):
        raise Seen(tensor.device, tensor.dtype, tensor.numel())

    with pytest.raises(Seen) as seen:
        Runtime(0, 2, torch.device("meta"), all_reduce=stop).mean_metrics({"a": 1.0, "b": torch.tensor(2.0)})
    assert seen.value.args == (torch.device("meta"), torch.float64, 2)
    # one call for every key; the mean comes back as floats, in key order
    rec = Recorder()
    assert Runtime(0, 2, all_reduce=rec).mean_metrics({"b": torch.tensor(3.0), "a": 1.5}) == {"a": 1.5, "b": 3.0}
    assert len(rec.calls) == 1
    assert Runtime().mean_metrics({"a": torch.tensor(2.0, dtype=torch.bfloat16)}) == {"a": 2.0}


def test_gradient_buckets_start_during_backward_on_the_runtime_device():
    rec = Recorder()
    runtime = Runtime(0, 2, torch.device("meta"), all_reduce=rec)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)).to("meta")
    with runtime.gradient_sync(list(model.parameters()), bucket_bytes=64) as sync:
        model(torch.randn(2, 4, device="meta")).sum().backward()
        started = len(rec.calls)
        sync.finish()
    # 4 parameters of 32, 8, 24 and 3 floats in 64-byte buckets, last layer first: every bucket
    # was complete, and its all-reduce started, before backward returned
    assert started == len(rec.calls) == 4
    assert [numel for _, _, numel in rec.calls] == [3 + 1, 24 + 1, 8 + 1, 32 + 1]  # gradients + one flag each
    assert all(device.type == "meta" for device, _, _ in rec.calls)
    assert all(p.grad.device.type == "meta" for p in model.parameters())
    # the hooks are gone with the context: a later backward starts nothing
    model(torch.randn(2, 4, device="meta")).sum().backward()
    assert len(rec.calls) == 4


def test_stage_loops_reduce_metrics_at_log_steps_only(tiny_lm_dir, tiny_bert_dir, toy_sets):
    from dilm_ray.data import BUILTIN_TASKS
    from dilm_ray.models.generator import build_generator
    from dilm_ray.models.learner import build_learner
    from dilm_ray.train.distill import DistillInputs, distill
    from dilm_ray.train.pretrain import pretrain

    train, _ = toy_sets
    gen_cfg = GeneratorConfig(model=str(tiny_lm_dir), max_length=12, train_top_layers=1)
    gen = build_generator(gen_cfg, BUILTIN_TASKS["sst2"])
    rec = Recorder()
    runtime = Runtime(0, 2, all_reduce=rec)
    pretrain(gen, train, PretrainConfig(steps=6, batch_size=8, log_every=3), gen_cfg, seed=0, runtime=runtime)
    metrics = [c for c in rec.calls if c[1] == torch.float64]
    grads = [c for c in rec.calls if c[1] == torch.float32]
    assert len(metrics) == 2  # steps 3 and 6, not every step
    assert len(grads) == 6  # one bucket a step: the top block and the label rows fit in 25 MB
    rec.calls.clear()
    learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=12), 2, seed=0)
    cfg = DistillConfig(steps=4, inner_loop=2, learner_steps=1, log_every=4, n_repset=1, repset_dpc=4, gm_real_dpc=2,
                        gm_syn_dpc=2, generate_interval=2, learner_batch_size=4)
    distill(gen, learner, DistillInputs(train, cfg, gen_cfg, seed=0), runtime=runtime)
    assert len([c for c in rec.calls if c[1] == torch.float64]) == 1  # the one log step
    assert len([c for c in rec.calls if c[1] == torch.float32]) == 4  # one bucket per matching step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "a": torch.nn.Linear(16, 32), "b": torch.nn.Linear(32, 5), "only0": torch.nn.Linear(16, 5), "never": torch.nn.Linear(2, 2),
    })
    runtime = Runtime.from_environment()
    params = list(model.parameters())
    results = {}
    with runtime.gradient_sync(params, bucket_bytes=600) as sync:
        for step in range(2):
            torch.manual_seed(100 * rank + step)
            x = torch.randn(7, 16)
            y = model["b"](torch.tanh(model["a"](x)))
            if rank == 0:  # a parameter only one worker has a gradient for
                y = y + model["only0"](x)
            y.square().mean().backward()
            # the reference: one all-reduce per tensor, of a copy taken before the sync
            reference = {}
            for name, p in model.named_parameters():
                g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(g)
                reference[name] = g / 2
            sync.finish()
            results[step] = {name: (p.grad is not None, p.grad is not None and torch.equal(p.grad, reference[name]))
                             for name, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
    out[rank] = results
    dist.destroy_process_group()


def test_bucketed_sync_equals_a_per_tensor_all_reduce_over_two_gloo_workers():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sync_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        for step in (0, 1):
            got = results[rank][step]
            for name, (has, equal) in got.items():
                if name.startswith("never"):
                    assert not has  # no worker had one: stays None
                else:
                    assert has and equal, (rank, step, name)  # bit-identical mean, on both workers
