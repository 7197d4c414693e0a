"""The PatchCore baseline: greedy coreset, nearest-neighbour maps, aggregation, batch independence."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from vpdm.bench.patchcore import (
    PatchCore,
    PatchCoreConfig,
    greedy_coreset,
    local_aggregate,
    nn_distances,
    random_projection,
)
from vpdm.errors import ConfigError, DataError


def _brute_force_greedy(x: torch.Tensor, first: int, n: int) -> list[int]:
    """Textbook farthest-first traversal from a given first point (float64, full distance matrix)."""
    d = torch.cdist(x.double(), x.double())
    picks = [first]
    min_dist = d[first].clone()
    for _ in range(1, n):
        i = int(torch.argmax(min_dist))
        picks.append(i)
        min_dist = torch.minimum(min_dist, d[i])
    return picks


def _coverage_radius(x: torch.Tensor, centers: list[int]) -> float:
    return float(torch.cdist(x.double(), x[centers].double()).min(dim=1).values.max())


@pytest.mark.parametrize("clustered", [False, True])
def test_greedy_coreset_picks_the_farthest_point_every_step(clustered):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    if clustered:  # tight clusters exercise the triangle-inequality pruning and the compaction
        x = torch.randn(12, 16, generator=g)[torch.randint(0, 12, (600,), generator=g)] * 5 + 0.3 * x
    picks = greedy_coreset(x, 60, projection_dim=None, seed=3).tolist()
    assert len(picks) == len(set(picks)) == 60
    d = torch.cdist(x.double(), x.double())
    min_dist = d[picks[0]].clone()
    for i in picks[1:]:
        # the pick is a point farthest from everything picked so far (up to float32 rounding)
        assert float(min_dist[i]) == pytest.approx(float(min_dist.max()), rel=1e-4, abs=1e-4)
        min_dist = torch.minimum(min_dist, d[i])
    # and on non-degenerate data that is exactly the brute-force sequence
    assert picks == _brute_force_greedy(x, picks[0], 60)


def test_greedy_coreset_first_point_is_farthest_on_average_from_random_starts():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    picks = greedy_coreset(x, 5, projection_dim=None, seed=7, num_starts=10)
    starts = torch.randperm(200, generator=torch.Generator().manual_seed(7))[:10]
    expected = int(torch.cdist(x.double(), x[starts].double()).mean(dim=1).argmax())
    assert int(picks[0]) == expected


def test_greedy_coreset_is_within_twice_the_optimal_radius():
    """Gonzalez's bound on a brute-forced k-center instance (12 points, k = 3: all 220 subsets)."""
    for seed in range(5):
        x = torch.randn(12, 2, generator=torch.Generator().manual_seed(seed))
        for k in (2, 3, 4):
            optimal = min(_coverage_radius(x, list(c)) for c in itertools.combinations(range(12), k))
            greedy = _coverage_radius(x, greedy_coreset(x, k, projection_dim=None, seed=seed).tolist())
            assert optimal <= greedy <= 2 * optimal + 1e-9


def test_greedy_coreset_with_projection_is_greedy_in_the_projected_space():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=g)
    picks = greedy_coreset(x, 20, projection_dim=8, seed=5).tolist()
    projected = x @ random_projection(64, 8, 5)
    assert picks == _brute_force_greedy(projected, picks[0], 20)
    # a different projection seed gives another (valid) selection
    assert greedy_coreset(x, 20, projection_dim=8, seed=6).tolist() != picks


def test_greedy_coreset_edge_cases():
    x = torch.randn(10, 4)
    assert greedy_coreset(x, 50).tolist() == list(range(10))  # n >= N keeps everything
    dup = torch.zeros(20, 3)
    dup[:2] = torch.tensor([[1.0, 0, 0], [2.0, 0, 0]])
    picks = greedy_coreset(dup, 10, projection_dim=None)
    # stops once every remaining point coincides with a picked one: the three distinct points
    assert sorted(float(v) for v in dup[picks, 0]) == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError):
        greedy_coreset(x, 0)
    with pytest.raises(DataError):
        greedy_coreset(torch.zeros(0, 4), 3)


def test_random_projection_roughly_preserves_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 512, generator=g)
    p = x @ random_projection(512, 128, 0)
    ratio = torch.pdist(p) / torch.pdist(x)
    assert 0.8 < float(ratio.median()) < 1.2 and float(ratio.min()) > 0.5


def test_local_aggregate_is_the_neighbourhood_mean_including_borders():
    f = torch.randn(2, 3, 5, 5)
    out = local_aggregate(f, 3)
    torch.testing.assert_close(out[:, :, 2, 2], f[:, :, 1:4, 1:4].mean(dim=(2, 3)))
    torch.testing.assert_close(out[:, :, 0, 0], f[:, :, 0:2, 0:2].mean(dim=(2, 3)))  # corner: 4 neighbours
    torch.testing.assert_close(out[:, :, 0, 2], f[:, :, 0:2, 1:4].mean(dim=(2, 3)))  # edge: 6 neighbours
    assert local_aggregate(f, 1) is f


@pytest.mark.parametrize("k", [1, 3])
def test_nn_distances_match_sklearn(k):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 12, generator=g)
    queries = torch.randn(300, 12, generator=g)
    ours = nn_distances(queries, bank, k=k, max_elements=7000)  # forces many chunks
    ref, _ = NearestNeighbors(n_neighbors=k).fit(bank.numpy()).kneighbors(queries.numpy())
    np.testing.assert_allclose(ours.numpy(), ref.mean(axis=1), rtol=1e-4, atol=1e-4)


def test_anomaly_maps_are_nn_distances_to_the_bank():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(6, 10, 8, 8, generator=g)
    test = torch.randn(3, 10, 8, 8, generator=g)
    # full bank, no aggregation, raw features: the map is the NN distance to every training patch
    pc = PatchCore(coreset_ratio=1.0, max_bank=None, aggregate=1, standardise=False).fit(train)
    assert pc.bank.shape == (6 * 64, 10)
    ref, _ = (
        NearestNeighbors(n_neighbors=1)
        .fit(train.permute(0, 2, 3, 1).reshape(-1, 10).numpy())
        .kneighbors(test.permute(0, 2, 3, 1).reshape(-1, 10).numpy())
    )
    np.testing.assert_allclose(pc.anomaly_maps(test).numpy(), ref.reshape(3, 8, 8), rtol=1e-4, atol=1e-4)
    assert float(pc.anomaly_maps(train).abs().max()) < 1e-2  # training patches are in the bank


def test_subsampled_bank_and_standardised_aggregated_embedding():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(8, 6, 8, 8, generator=g) * torch.tensor([1.0, 10, 1, 1, 5, 1]).view(1, 6, 1, 1)
    pc = PatchCore(coreset_ratio=0.1, max_bank=None, projection_dim=4, standardise=True, seed=0).fit(train)
    assert pc.bank.shape == (52, 6)  # ceil(0.1 * 512)
    emb = pc.embed(train)
    # every bank vector is one of the embedded training patches
    assert float(torch.cdist(pc.bank, emb, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max()) < 1e-6
    # max_bank caps the bank
    assert PatchCore(coreset_ratio=0.5, max_bank=20).fit(train).bank.shape[0] == 20
    test = torch.randn(2, 6, 8, 8, generator=g)
    ref = torch.cdist(pc.embed(test), pc.bank).min(dim=1).values.view(2, 8, 8)
    torch.testing.assert_close(pc.anomaly_maps(test), ref, rtol=1e-4, atol=1e-4)


def _smooth_normal_features(n, seed):
    base = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(123))  # the "object"
    return base + 0.1 * torch.randn(n, 16, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("aggregate", [1, 3])
def test_planted_outlier_patch_gets_the_maximum(aggregate):
    train = _smooth_normal_features(10, 0)
    test = _smooth_normal_features(2, 1)
    test[1, :, 7, 4] += 3.0
    pc = PatchCore(coreset_ratio=0.2, aggregate=aggregate, seed=0).fit(train)
    maps = pc.anomaly_maps(test)
    row, col = divmod(int(maps[1].argmax()), 12)
    # without aggregation the planted patch itself; with it, the patch's 3 x 3 neighbourhood shares it
    assert abs(row - 7) <= aggregate // 2 and abs(col - 4) <= aggregate // 2
    assert float(maps[1].max()) > 3 * float(maps[0].max())


def test_maps_do_not_depend_on_the_batch():
    train = _smooth_normal_features(10, 0)
    test = _smooth_normal_features(5, 2)
    pc = PatchCore(coreset_ratio=0.2, seed=0).fit(train)
    together = pc.anomaly_maps(test, batch_size=5)
    alone = torch.cat([pc.anomaly_maps(test[i : i + 1]) for i in range(5)])
    shuffled = pc.anomaly_maps(test[[3, 0, 4, 1, 2]], batch_size=2)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, together[[3, 0, 4, 1, 2]], rtol=1e-5, atol=1e-5)


def test_fit_is_deterministic_in_the_seed():
    train = _smooth_normal_features(6, 0)
    a = PatchCore(coreset_ratio=0.1, seed=4).fit(train).bank
    b = PatchCore(coreset_ratio=0.1, seed=4).fit(train).bank
    torch.testing.assert_close(a, b)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="coreset_ratio"):
        PatchCore(coreset_ratio=0.0)
    with pytest.raises(ConfigError, match="aggregate"):
        PatchCore(aggregate=2)
    with pytest.raises(ConfigError, match="k must"):
        PatchCoreConfig(k=0).validate()
    pc = PatchCore()
    with pytest.raises(ConfigError, match="before fit"):
        pc.anomaly_maps(torch.zeros(1, 4, 8, 8))
    pc.fit(torch.randn(2, 4, 8, 8))
    with pytest.raises(DataError, match="do not match"):
        pc.anomaly_maps(torch.zeros(1, 5, 8, 8))
    with pytest.raises(DataError):
        pc.fit(torch.zeros(4, 8, 8))


def test_candidate_cap_selects_among_a_random_subset_of_patches():
    g = torch.Generator().manual_seed(2)
    train = torch.randn(8, 6, 8, 8, generator=g)  # 512 patch vectors
    emb = PatchCore(aggregate=3).embed(train)
    capped = PatchCore(coreset_ratio=0.25, max_bank=None, max_candidates=100, seed=3).fit(train)
    # the bank size still follows the ratio of all patches (128) but cannot exceed the candidates
    assert capped.bank.shape == (100, 6)
    assert capped.summary()["coreset_candidates"] == 100 and capped.summary()["training_patches"] == 512
    # every bank vector is a distinct training patch
    d = torch.cdist(capped.bank, emb, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(d.min(dim=1).values.max()) < 1e-6
    assert len(set(d.argmin(dim=1).tolist())) == 100
    # a cap at or above the patch count changes nothing
    full = PatchCore(coreset_ratio=0.1, max_bank=None, max_candidates=None, seed=3).fit(train)
    same = PatchCore(coreset_ratio=0.1, max_bank=None, max_candidates=512, seed=3).fit(train)
    torch.testing.assert_close(full.bank, same.bank)
    with pytest.raises(ConfigError, match="max_candidates"):
        PatchCore(max_candidates=0)
