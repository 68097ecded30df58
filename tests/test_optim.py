"""The shared optimizer: the fused kernel must give the same updates as the reference loop."""

import torch

from dilm_ray.train.optim import adamw, schedule


def test_fused_adamw_matches_reference_update():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = adamw(ours, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"]
    # reference: the same groups (decay on the matrix only) on the unfused loop
    ref_opt = torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}], lr=1e-2, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for params, o in ((ours, opt), (ref, ref_opt)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(ours[0], ref[0].new_zeros(()))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = schedule(opt, "cosine", total_steps=10, warmup_ratio=0.5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:6] == sorted(lrs[:6]) and lrs[5] == max(lrs) == 1.0  # 5 warmup steps, then the peak
    assert lrs[5:] == sorted(lrs[5:], reverse=True) and lrs[-1] < 0.1
