import torch
import torch.nn.functional as F

from dilm_ray.algorithm.matching import match_loss, per_sample_head_grads, sample_weights, weighted_grad


def test_sample_weights_prefer_likely_samples():
    w = sample_weights(torch.tensor([1.0, 2.0, 3.0]), temperature=1.0)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert w[0] > w[1] > w[2]
    flat = sample_weights(torch.tensor([1.0, 2.0, 3.0]), temperature=1e6)
    assert torch.allclose(flat, torch.full((3,), 1 / 3), atol=1e-5)


def test_per_sample_head_grads_equal_autograd():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 1, 0])
    head = torch.nn.Linear(4, 3)
    weights = torch.softmax(torch.randn(5, generator=g), 0)
    loss = (F.cross_entropy(head(features), labels, reduction="none") * weights).sum()
    gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    ours = weighted_grad(per_sample_head_grads(features, labels, head.weight.detach(), head.bias.detach()), weights)
    assert torch.allclose(ours, torch.cat([gw.flatten(), gb]), atol=1e-6)


def test_match_loss_values_and_gradient_reaches_the_weights():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert match_loss(real, real)[0].item() == 0.0
    assert torch.isclose(match_loss(real, real.flip(1))[0], torch.tensor(1.0))
    per_sample = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # one aligned, one orthogonal sample
    logits = torch.zeros(2, requires_grad=True)
    syn = weighted_grad(per_sample, torch.softmax(logits, 0))
    loss, _ = match_loss(real[:1], syn[None])
    loss.backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # descent raises the aligned sample's weight
