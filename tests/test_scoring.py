"""Distances and image scores against numpy / sklearn computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

from vpdm.errors import ConfigError
from vpdm.model.scoring import ScoringConfig, feature_distance, image_scores, score_maps

# The weighted combination of the reconstruction's terms alone (no fine prototypes, no statistics).
WEIGHTED = dict(fine_pools=(), fine_image_pools=None, combine="weighted")


def _pair(seed: int = 0, c: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, c, 4, 5, generator=g, dtype=torch.float64), torch.randn(
        3, c, 4, 5, generator=g, dtype=torch.float64
    )


def _per_position(a: torch.Tensor) -> np.ndarray:  # B x C x H x W -> (B*H*W) x C
    return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).numpy()


def test_cosine_distance_matches_sklearn() -> None:
    a, b = _pair()
    want = 1 - np.diag(cosine_similarity(_per_position(a), _per_position(b)))
    got = feature_distance(a, b, "cosine").reshape(-1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_cosine_is_scale_invariant_and_l2_is_not() -> None:
    a, b = _pair(2)
    torch.testing.assert_close(feature_distance(3 * a, 0.5 * b, "cosine"), feature_distance(a, b, "cosine"))
    assert not torch.allclose(feature_distance(3 * a, b, "l2"), feature_distance(a, b, "l2"))


@pytest.mark.parametrize("percent", [0.5, 1.0, 10.0, 100.0])
def test_top_k_image_score_is_the_mean_of_the_largest_pixels(percent: float) -> None:
    maps = torch.rand(4, 30, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k = max(1, int(round(900 * percent / 100)))
    want = np.sort(maps.reshape(4, -1).numpy(), axis=1)[:, -k:].mean(1)
    np.testing.assert_allclose(image_scores(maps, 16, "top_k", percent).numpy(), want, rtol=1e-12)
    cfg = ScoringConfig(image_score="top_k", top_k_percent=percent)
    np.testing.assert_allclose(score_maps(maps, cfg).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize(
    "field,value",
    [
        ("distance", "l1"),
        ("image_score", "max"),
        ("top_k_percent", 0.0),
        ("top_k_percent", float("nan")),
        ("feature_space", "pixels"),
    ],
)
def test_bad_scoring_settings_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"scoring.{field}"):
        ScoringConfig(**{field: value}).validate()


def test_pooled_and_aggregated_maps_match_numpy() -> None:
    from vpdm.model.scoring import distance_map

    a, b = _pair(4, c=3)
    a, b = (
        torch.nn.functional.pad(a, (0, 3, 0, 4))[:, :, :8, :8],
        torch.nn.functional.pad(b, (0, 3, 0, 4))[:, :, :8, :8],
    )
    an, bn = a.numpy(), b.numpy()
    blocks = lambda x: x.reshape(3, 3, 2, 4, 2, 4).mean(axis=(3, 5))  # noqa: E731  4x4 block means
    want = np.sqrt(((blocks(an) - blocks(bn)) ** 2).sum(1))  # 3 x 2 x 2
    got = distance_map(a, b, ScoringConfig(pools=(4,)))
    up = torch.nn.functional.interpolate(
        torch.from_numpy(want)[:, None], size=(8, 8), mode="bilinear", align_corners=False
    )[:, 0]
    np.testing.assert_allclose(got.numpy(), 4 * up.numpy(), rtol=1e-10)  # weighted by the block side
    # two scales: the p-weighted mean of the single-scale maps
    both = distance_map(a, b, ScoringConfig(pools=(1, 4)))
    np.testing.assert_allclose(
        both.numpy(), (distance_map(a, b, ScoringConfig(pools=(1,))).numpy() + 4 * up.numpy()) / 2, rtol=1e-10
    )
    # aggregate 3: the mean of each position's existing 3x3 neighbours
    pad = lambda x: np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=np.nan)  # noqa: E731

    def local(x):
        p = pad(x)
        stack = np.stack([p[:, :, i : i + 8, j : j + 8] for i in range(3) for j in range(3)])
        return np.nanmean(stack, axis=0)

    want3 = np.sqrt(((local(an) - local(bn)) ** 2).sum(1))
    np.testing.assert_allclose(distance_map(a, b, ScoringConfig(aggregate=3, pools=(1,))).numpy(), want3, rtol=1e-10)
    with pytest.raises(ConfigError, match="pools"):
        distance_map(a, b, ScoringConfig(pools=(3,)))


def test_the_image_score_comes_from_its_own_block_sides_and_the_map_from_pools() -> None:
    """scores_and_maps: the map is the `pools` distance post-processed; the image score equals the score
    of the map computed with `image_pools` alone (and of the map itself when image_pools is null)."""
    from vpdm.model.scoring import distance_map, postprocess_maps, scores_and_maps

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 6, 8, 8, generator=g), torch.randn(4, 6, 8, 8, generator=g)
    b[1, :, 4:, 4:] += 3.0  # one image with a block-sized anomaly
    cfg = ScoringConfig(pools=(1, 4), image_pools=(4,), **WEIGHTED)
    scores, maps = scores_and_maps(a, b, cfg, 32)
    want_map = postprocess_maps(distance_map(a, b, ScoringConfig(pools=(1, 4), **WEIGHTED)), 32, cfg.blur_sigma)
    torch.testing.assert_close(maps, want_map)
    only_image = ScoringConfig(pools=(4,), **WEIGHTED)
    want_scores = score_maps(postprocess_maps(distance_map(a, b, only_image), 32, cfg.blur_sigma), only_image)
    torch.testing.assert_close(scores, want_scores)
    assert not torch.allclose(scores, score_maps(maps, cfg))  # the two block sets really differ here
    same, same_maps = scores_and_maps(a, b, ScoringConfig(pools=(1, 4), image_pools=None, **WEIGHTED), 32)
    torch.testing.assert_close(same, score_maps(same_maps, cfg))
    assert int(scores.argmax()) == 1


@pytest.mark.parametrize("bad", [(0,), (2, 2), ("4",), 4.5])
def test_image_pools_refuses_what_is_not_a_list_of_distinct_positive_integers(bad) -> None:
    with pytest.raises(ConfigError, match="scoring.image_pools"):
        ScoringConfig(image_pools=bad).validate()


def test_the_map_and_the_image_score_each_need_a_term() -> None:
    ScoringConfig(image_pools=()).validate()  # the fine condition's terms alone make an image score
    with pytest.raises(ConfigError, match="without a term"):
        ScoringConfig(image_pools=(), fine_image_pools=()).validate()
    with pytest.raises(ConfigError, match="at least one term"):
        ScoringConfig(pools=(), fine_pools=()).validate()
    with pytest.raises(ConfigError, match="scoring.combine"):
        ScoringConfig(combine="sum").validate()


def test_image_pools_must_divide_the_feature_size() -> None:
    from vpdm.config.schema import VPDMConfig

    with pytest.raises(ConfigError, match="scoring.image_pools: 3 must divide"):
        VPDMConfig().with_overrides(["scoring.image_pools=[3]"]).validate()


@pytest.mark.parametrize("pool", [1, 4, 16, 50])
def test_max_pool_image_score_is_the_max_of_the_box_means(pool: int) -> None:
    """The separable pooling equals the k x k box means computed directly (numpy)."""
    g = torch.Generator().manual_seed(pool)
    maps = torch.rand(3, 37, 41, generator=g, dtype=torch.float64)
    m = maps.numpy()
    k = min(pool, 37)
    want = np.array(
        [max(m[b, i : i + k, j : j + k].mean() for i in range(37 - k + 1) for j in range(41 - k + 1)) for b in range(3)]
    )
    np.testing.assert_allclose(image_scores(maps, pool).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize(
    ("pool", "sigma", "shape"), [(16, 2.0, (32, 32)), (4, 0.0, (8, 8)), (50, 4.0, (13, 7)), (1, 1.0, (5, 6))]
)
def test_image_score_from_the_raw_map_equals_the_score_of_the_post_processed_map(pool, sigma, shape) -> None:
    """The matrix path (upsampling, blur and box mean folded into R_h X R_w^T, no full-size map) gives the
    score of the explicit path: post-process to size x size, then the box-mean max."""
    from vpdm.model.scoring import postprocess_maps, scores_of_raw_maps

    g = torch.Generator().manual_seed(pool)
    raw = torch.rand(3, *shape, generator=g, dtype=torch.float64) * 5 - 1
    cfg = ScoringConfig(pool_size=pool, blur_sigma=sigma)
    want = image_scores(postprocess_maps(raw, 64, sigma), pool)
    torch.testing.assert_close(scores_of_raw_maps(raw, 64, cfg), want, rtol=1e-10, atol=1e-12)
    # float32 maps: the same to float rounding; top_k falls back to the explicit path
    torch.testing.assert_close(scores_of_raw_maps(raw.float(), 64, cfg), want.float(), rtol=1e-5, atol=1e-5)
    top = ScoringConfig(pool_size=pool, blur_sigma=sigma, image_score="top_k")
    torch.testing.assert_close(scores_of_raw_maps(raw, 64, top), score_maps(postprocess_maps(raw, 64, sigma), top))
