"""The shared optimizer: the fused kernel must give the same updates as the reference loop."""

import torch

from dilm_ray.train.optim import adamw, schedule


def test_fused_adamw_matches_reference_update():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = adamw(ours, lr=1e-2, weight_decay=0.1)
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


def test_weight_decay_skips_vectors_and_flagged_embeddings():
    matrix, bias, embedding = (torch.nn.Parameter(torch.ones(*shape)) for shape in ((3, 2), (3,), (5, 2)))
    embedding._dilm_no_decay = True  # embeddings whose rows are gradient-masked (label tokens)
    frozen = torch.nn.Parameter(torch.ones(2, 2), requires_grad=False)
    groups = {g["weight_decay"]: g["params"] for g in adamw([matrix, bias, embedding, frozen], lr=1.0, weight_decay=0.5).param_groups}
    assert [p is matrix for p in groups[0.5]] == [True]
    assert {id(p) for p in groups[0.0]} == {id(bias), id(embedding)}
    # with a zero gradient only decay moves a parameter: the matrix shrinks, the others stay
    opt = adamw([matrix, bias, embedding], lr=0.1, weight_decay=0.5)
    for p in (matrix, bias, embedding):
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(matrix, torch.full_like(matrix, 1 - 0.1 * 0.5))
    assert torch.equal(bias, torch.ones(3)) and torch.equal(embedding, torch.ones(5, 2))


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
