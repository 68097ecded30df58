import torch

from dilm_ray.algorithm.selection import herding, k_centers, kmeans, nearest_to_centers, random_subset


def _blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    return torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centers]), centers


def test_kmeans_recovers_separated_blobs():
    x, true_centers = _blobs()
    centers, assign = kmeans(x, 3, seed=1)
    for c in true_centers:
        assert torch.cdist(c[None], centers).min() < 0.2
    # every blob is one cluster
    for b in range(3):
        assert assign[20 * b : 20 * (b + 1)].unique().numel() == 1


def test_nearest_to_centers_picks_distinct_points():
    x = torch.tensor([[0.0], [1.0], [1.1], [5.0]])
    idx = nearest_to_centers(x, torch.tensor([[1.05], [1.06]]))
    assert sorted(idx.tolist()) == [1, 2]


def test_k_centers_picks_the_middle_of_each_cluster_not_its_edges():
    # three tight clusters on a line; farthest-first would pick the edges (0.0, 20.4)
    x = torch.tensor([[c + o] for c in (0.0, 10.0, 20.0) for o in (0.0, 0.1, 0.2, 0.3, 0.4)])
    for seed in range(5):
        assert sorted(k_centers(x, 3, seed).tolist()) == [2, 7, 12]


def test_herding_tracks_the_mean():
    x = torch.tensor([[0.0], [10.0], [4.0], [6.0]])
    picked = herding(x, 2).tolist()
    assert picked[0] in (2, 3)  # closest to the mean 5
    assert picked[1] == (3 if picked[0] == 2 else 2)  # together they average exactly 5


def test_random_subset_is_seeded():
    assert random_subset(100, 5, 3).tolist() == random_subset(100, 5, 3).tolist()
    assert random_subset(100, 5, 3).tolist() != random_subset(100, 5, 4).tolist()
