"""VPOT: Sinkhorn against POT, the Gibbs-form identity behind per-image assignment, gradients."""

import math

import numpy as np
import ot
import pytest
import torch

from vpdm.errors import ConfigError
from vpdm.model.vpot import VaguePrototypes, VPOTConfig, sinkhorn_log, vague


def _problem(n=7, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, m, generator=g, dtype=torch.float64)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.2
    return cost, a / a.sum(), b / b.sum()


@pytest.mark.parametrize("reg", [0.5, 0.05])
def test_sinkhorn_matches_pot(reg):
    cost, a, b = _problem()
    plan, _, _ = sinkhorn_log(cost, a, b, reg, num_iters=5000, tol=1e-12)
    ref = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
    np.testing.assert_allclose(plan.numpy(), ref, atol=1e-8)


def test_sinkhorn_stable_in_float32_for_small_reg():
    cost, a, b = (x.float() for x in _problem(40, 50, seed=1))
    cost = cost * 30  # costs far above reg: the plain (non-log) Sinkhorn underflows here
    plan, f, g = sinkhorn_log(cost, a, b, reg=0.01, num_iters=2000)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(1), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(0), b, atol=1e-3, rtol=0)
    # Dual optimality: the plan has the Gibbs form of its potentials.
    torch.testing.assert_close(plan, torch.exp((f[:, None] + g[None, :] - cost) / 0.01))


def test_sinkhorn_batched_problems_are_independent():
    c1, a, b = _problem(seed=2)
    c2, _, _ = _problem(seed=3)
    both, _, _ = sinkhorn_log(torch.stack([c1, c2]), torch.stack([a, a]), torch.stack([b, b]), 0.1, 500)
    one, _, _ = sinkhorn_log(c2, a, b, 0.1, 500)
    torch.testing.assert_close(both[1], one)


def test_row_normalised_plan_is_softmax_of_prototype_potential():
    """The identity the per-image assignment rests on: the image-side potential cancels."""
    cost, a, b = _problem(6, 4, seed=4)
    plan, _, g = sinkhorn_log(cost, a, b, 0.1, 1000)
    rows = plan / plan.sum(1, keepdim=True)
    torch.testing.assert_close(rows, torch.softmax((g[None, :] - cost) / 0.1, dim=1))


PAPER_LEVEL = {"level": "image", "ot_scope": "batch", "init": "samples"}  # the paper's prototypes


def _module(k=6, n=2, channels=3, size=8, **kw):
    """Whole-image prototypes matched by batch OT (the paper's VPOT) unless ``kw`` says otherwise."""
    torch.manual_seed(0)
    return VaguePrototypes(VPOTConfig(num_prototypes=k, downsample=n, **{**PAPER_LEVEL, **kw}), channels, size)


def test_vague_is_average_pooling():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    np.testing.assert_allclose(vague(x, 2)[0, 0].numpy(), [[2.5, 4.5], [10.5, 12.5]])
    assert vague(x, 1) is x


def test_training_plan_is_balanced_and_yhat_has_feature_shape():
    m = _module().train()
    feats = torch.randn(5, 3, 8, 8)
    out = m(feats)
    assert out["yhat"].shape == feats.shape
    torch.testing.assert_close(out["weights"].sum(1), torch.ones(5))
    # yhat is constant inside each N x N block before bilinear upsampling: low-pass by construction
    k = m.prototypes.shape[0]
    assert out["weights"].shape == (5, k)


def test_inference_condition_does_not_depend_on_batch():
    m = _module().train()
    for _ in range(5):  # learn a potential
        m(torch.randn(8, 3, 8, 8))
    m.eval()
    feats = torch.randn(6, 3, 8, 8)
    alone = torch.cat([m(feats[i : i + 1])["yhat"] for i in range(6)])
    together = m(feats)["yhat"]
    shuffled = m(torch.cat([feats[3:], torch.randn(4, 3, 8, 8), feats[:3]]))["yhat"]
    torch.testing.assert_close(alone, together)
    torch.testing.assert_close(torch.cat([shuffled[-3:], shuffled[:3]]), together)


def test_balanced_training_plan_does_depend_on_batch():
    """Why the per-image rule is needed: with one image the balanced plan is uniform."""
    m = _module().train()
    out = m(torch.randn(1, 3, 8, 8))
    torch.testing.assert_close(out["weights"], torch.full((1, 6), 1 / 6))


def test_ot_loss_gradient_matches_pot_value_gradient():
    """Envelope theorem: d OT_eps / d prototypes equals the gradient of <P*, C> with P* fixed.
    Checked against a finite difference of POT's entropic OT value."""
    m = _module(k=4, n=2, ot_reg=0.1, sinkhorn_iters=2000).double().train()
    feats = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    out = m(feats)
    out["ot_loss"].backward()
    grad = m.prototypes.grad.clone()

    def value(protos):
        flat = vague(feats, 2).flatten(1).numpy()
        cost = np.sqrt(((flat[:, None, :] - protos[None]) ** 2).sum(-1)) / np.sqrt(flat.shape[1])
        a, b = np.full(5, 1 / 5), np.full(4, 1 / 4)
        plan = ot.sinkhorn(a, b, cost, 0.1, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
        return (plan * cost).sum() + 0.1 * (plan * np.log(plan)).sum()

    protos = m.prototypes.detach().numpy().copy()
    h = 1e-5
    for idx in [(0, 0), (2, 5), (3, 11)]:
        p1, p2 = protos.copy(), protos.copy()
        p1[idx] += h
        p2[idx] -= h
        fd = (value(p1) - value(p2)) / (2 * h)
        assert grad[idx].item() == pytest.approx(fd, rel=1e-3, abs=1e-7)


def test_prototypes_get_gradient_through_yhat():
    m = _module().train()
    out = m(torch.randn(4, 3, 8, 8))
    out["yhat"].pow(2).sum().backward()
    assert m.prototypes.grad.abs().sum() > 0


def test_nearest_assignment_picks_closest_prototype():
    m = _module(k=3, assignment="nearest").eval()
    with torch.no_grad():
        m.prototypes.copy_(torch.stack([torch.full((m.dim,), v) for v in (-1.0, 0.0, 5.0)]))
    feats = torch.full((1, 3, 8, 8), 4.0)
    out = m(feats)
    torch.testing.assert_close(out["weights"], torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(out["yhat"], torch.full_like(feats, 5.0))


def test_local_prototypes_keep_the_layout_and_kmeans_init_is_lloyds_fixed_point():
    """Local level: each vague position is its own OT sample; k-means init ends at a Lloyd fixed point
    (every prototype is the mean of the samples nearest to it)."""
    m = _module(k=4, n=2, level="local", init="kmeans", ot_scope="none", kmeans_iters=50).eval()
    torch.manual_seed(3)
    feats = torch.randn(10, 3, 8, 8)
    m.init_from(feats, torch.Generator().manual_seed(0))
    samples = vague(feats, 2).permute(0, 2, 3, 1).reshape(-1, 3)
    assert m.samples(feats).shape == (10 * 16, 3)
    torch.testing.assert_close(m.samples(feats), samples)
    protos = m.prototypes.detach()
    nearest = torch.cdist(samples, protos).argmin(1)
    for j in range(4):
        if (nearest == j).any():
            torch.testing.assert_close(protos[j], samples[nearest == j].mean(0), rtol=0, atol=1e-5)
    out = m(feats)
    assert out["weights"].shape == (160, 4) and out["yhat"].shape == feats.shape
    # the condition of position (i, j) is built from that position's own assignment
    y = (out["weights"] @ protos).view(10, 4, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(
        out["yhat"], torch.nn.functional.interpolate(y, size=8, mode="bilinear", align_corners=False)
    )


def test_init_from_samples_copies_vague_features():
    m = _module(k=3)
    feats = torch.randn(3, 3, 8, 8)
    m.init_from(feats, torch.Generator().manual_seed(0))
    flat = vague(feats, 2).flatten(1)
    d = torch.cdist(m.prototypes.detach(), flat).min(1).values
    assert (d < 0.1).all()


@pytest.mark.parametrize(
    "kw, size",
    [
        ({"num_prototypes": 0}, 8),
        ({"downsample": 3}, 8),
        ({"ot_reg": 0.0}, 8),
        ({"assignment": "x"}, 8),
        ({"downsample": 0}, 8),
    ],
)
def test_bad_config_is_refused(kw, size):
    with pytest.raises(ConfigError) as err:
        VPOTConfig(**kw).validate(size)
    assert str(next(iter(kw.values()))) in str(err.value)


def test_free_prototype_marginal_is_the_gibbs_softmax_in_training_and_inference():
    torch.manual_seed(1)
    m = VaguePrototypes(VPOTConfig(num_prototypes=5, downsample=2, ot_reg=0.1, ot_scope="none", level="local"), 3, 4)
    feats = torch.randn(6, 3, 4, 4)
    flat = torch.nn.functional.avg_pool2d(feats, 2).permute(0, 2, 3, 1).reshape(-1, 3)
    want = torch.softmax(-(torch.cdist(flat, m.prototypes.detach()) / math.sqrt(3)) / 0.1, dim=1)
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(feats)["weights"].detach(), want)
    assert float(m.potential.abs().sum()) == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        dict(level="local", ot_scope="none"),
        dict(level="image", ot_scope="batch"),
        dict(level="local", assignment="nearest"),
    ],
)
def test_inference_assignment_without_the_loss_is_the_same_condition(kw):
    """with_loss=False (what inference calls) folds the scaling and skips the loss: the same yhat and
    weights as the full eval-mode forward, after training has set a nonzero prototype potential."""
    torch.manual_seed(2)
    m = VaguePrototypes(VPOTConfig(num_prototypes=7, downsample=2, ot_reg=0.1, **kw), 3, 4)
    m.train()
    for _ in range(3):  # the batch scope moves the stored potential
        m(torch.randn(8, 3, 4, 4))
    if kw.get("ot_scope") == "batch":
        assert float(m.potential.abs().sum()) > 0
    m.eval()
    feats = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        full, fast = m(feats), m(feats, with_loss=False, histogram=True)
    assert set(fast) == {"yhat", "histogram"} and set(m(feats, with_loss=False)) == {"yhat"}
    per_image = full["weights"].reshape(5, -1, 7).mean(dim=1)
    torch.testing.assert_close(fast["histogram"], per_image, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.weights(m.samples(feats)), full["weights"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast["yhat"], full["yhat"], rtol=1e-5, atol=1e-6)
    m.train()
    with pytest.raises(RuntimeError, match="eval"):
        m(feats, with_loss=False)


def test_coreset_init_covers_rare_looks_that_kmeans_leaves_out():
    """Small parts on a large background: 2000 background blocks around one look and six rare looks far away
    (3 blocks each). K-means from random samples spends its centres where the blocks are dense; the greedy
    k-center coreset (PatchCore's) keeps every training block within its coverage radius, so every rare look
    has a prototype near it."""
    torch.manual_seed(0)
    dense = torch.randn(2000, 8) * 0.3
    centres = torch.cat([6.0 * torch.eye(8)[:3], -6.0 * torch.eye(8)[:3]])
    rare = centres.repeat_interleave(3, dim=0) + 0.05 * torch.randn(18, 8)
    feats = torch.cat([dense, rare]).T.reshape(1, 8, 1, 2018)  # one "image", one row of 2018 positions
    out = {}
    for init in ("kmeans", "coreset", "coreset_kmeans"):
        vp = VaguePrototypes(VPOTConfig(num_prototypes=8, downsample=1, init=init, kmeans_iters=10), 8, 1)
        vp.init_from(feats, torch.Generator().manual_seed(1))
        out[init] = torch.cdist(rare, vp.prototypes.detach()).min(dim=1).values.max()
    assert out["coreset"] < 0.5 and out["coreset_kmeans"] < 0.5  # a prototype sits among the rare blocks
    assert out["kmeans"] > 3.0  # k-means left them to the background centres


def test_coreset_prototypes_are_training_blocks_and_refuse_unknown_inits():
    feats = torch.randn(3, 4, 8, 8)
    vp = VaguePrototypes(VPOTConfig(num_prototypes=10, downsample=2, init="coreset"), 4, 8)
    vp.init_from(feats, torch.Generator().manual_seed(0))
    blocks = vp.samples(feats)
    nearest = torch.cdist(vp.prototypes.detach(), blocks).min(dim=1).values
    assert nearest.max() < 0.1  # each is a training block (plus the 0.01 jitter every init adds)
    with pytest.raises(ConfigError, match="prototypes.init"):
        VPOTConfig(init="kcenter").validate()


def _short_list_module(k=40, lists=6, probes=2, channels=5, size=8, n=2, ot_reg=0.1):
    torch.manual_seed(4)
    m = VaguePrototypes(
        VPOTConfig(num_prototypes=k, downsample=n, list_size=math.ceil(k / lists), probes=probes, ot_reg=ot_reg),
        channels,
        size,
    )
    feats = torch.randn(12, channels, size, size) * 2
    m.init_from(feats, torch.Generator().manual_seed(0))
    return m.eval(), feats


def test_short_lists_are_sorted_groups_of_the_nearest_centroid():
    m, _ = _short_list_module()
    offsets = m.list_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == 40 and all(b > a for a, b in zip(offsets, offsets[1:]))  # none empty
    nearest = torch.cdist(m.prototypes.detach(), m.list_centroids).argmin(dim=1)
    assert torch.equal(nearest, m.list_of)
    assert torch.equal(m.list_of, torch.repeat_interleave(torch.arange(6), torch.tensor(offsets).diff()))


@pytest.mark.parametrize("ot_reg", [0.1, 0.002])
def test_short_list_assignment_is_the_kernel_over_the_probed_lists_only(ot_reg):
    """Reference in numpy: each sample's candidates are the prototypes of its `probes` nearest lists; its
    weights are the softmax of -||x - B_j|| / (sqrt(d) eps) over them. Both the masked dense form and the
    grouped fast path give it, and so the condition, each image's mean weights and its class mass. A wide
    kernel is summed in one pass (logits shifted by the nearest centroid's distance), a narrow one, whose
    shifted logits could overflow exp, in two (shifted by each sample's max)."""
    m, feats = _short_list_module(ot_reg=ot_reg)
    scale = 1 / (np.sqrt(5) * ot_reg)
    radius = float((m.prototypes.detach() - m.list_centroids[m.list_of]).norm(dim=1).max())
    assert (scale * radius <= 60) == (ot_reg == 0.1)  # both paths are exercised
    m, feats = m.double(), feats.double()  # float64 throughout: the comparison is of the rule, not of rounding
    m.owner.copy_(torch.arange(40) % 3)
    m.owner[5] = -1  # a prototype of unknown class counts for no class
    flat = m.samples(feats).double().numpy()
    protos = m.prototypes.detach().double().numpy()
    cents = m.list_centroids.double().numpy()
    ref = np.zeros((len(flat), 40))
    for i, x in enumerate(flat):
        probed = np.argsort(np.linalg.norm(cents - x, axis=1))[:2]
        cand = np.flatnonzero(np.isin(m.list_of.numpy(), probed))
        logits = -np.linalg.norm(protos[cand] - x, axis=1) / (np.sqrt(5) * ot_reg)
        e = np.exp(logits - logits.max())
        ref[i, cand] = e / e.sum()
    with torch.no_grad():
        dense = m.weights(m.samples(feats))
    np.testing.assert_allclose(dense.numpy(), ref, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        fast = m(feats, with_loss=False, histogram=True, num_classes=3)
    y = torch.from_numpy(ref @ protos).view(12, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(
        fast["yhat"],
        torch.nn.functional.interpolate(y, size=8, mode="bilinear", align_corners=False),
        rtol=1e-4,
        atol=1e-5,
    )
    hist = ref.reshape(12, 16, 40).mean(axis=1)
    np.testing.assert_allclose(fast["histogram"].numpy(), hist, rtol=1e-4, atol=1e-7)
    owner = (np.arange(40) % 3)[None, :] == np.arange(3)[:, None]
    owner[:, 5] = False
    np.testing.assert_allclose(fast["class_mass"].numpy(), hist @ owner.T, rtol=1e-4, atol=1e-7)
    # probing every list is the exact kernel over every prototype
    m.config.probes = 6
    with torch.no_grad():
        everything = torch.softmax(-torch.cdist(m.samples(feats), m.prototypes) / (np.sqrt(5) * ot_reg), dim=1)
        torch.testing.assert_close(m.weights(m.samples(feats)), everything, rtol=1e-5, atol=1e-7)
    # one image at a time or in a batch: the same condition
    with torch.no_grad():
        alone = m(feats[3:4], with_loss=False)["yhat"]
        batch = m(feats, with_loss=False)["yhat"][3:4]
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-6)


def test_runs_of_whole_lists_cover_every_pair_once_in_order():
    from vpdm.model.vpot import _chunks_of_lists

    groups, counts = [3, 5, 8, 9, 11], [2, 9, 1, 1, 3]
    runs = list(_chunks_of_lists(groups, counts, 4))
    # a list larger than the run size goes alone; the others are packed up to the size
    assert [(first, end) for first, end, _ in runs] == [(0, 2), (2, 11), (11, 13), (13, 16)]
    pairs = [(g, first + a, first + b) for first, _, run in runs for g, a, b in run]
    assert pairs == [(3, 0, 2), (5, 2, 11), (8, 11, 12), (9, 12, 13), (11, 13, 16)]
    # with list lengths (longest first), a run also ends before a list shorter than 3/4 of its first
    runs = list(_chunks_of_lists(groups, [1, 1, 1, 1, 1], 100, [40, 31, 30, 29, 10]))
    assert [[g for g, _, _ in run] for _, _, run in runs] == [[3, 5, 8], [9], [11]]


@pytest.mark.parametrize("ot_reg", [0.1, 0.002])
def test_short_lists_in_many_small_runs_give_the_same_assignment(ot_reg, monkeypatch):
    """The grouped path gathers samples a run of lists at a time; runs of a few pairs (every run boundary
    crossed many times) give what one run gives, in one pass (wide kernel) and in two (narrow)."""
    from vpdm.model import vpot

    m, feats = _short_list_module(ot_reg=ot_reg)
    m, feats = m.double(), feats.double()
    with torch.no_grad():
        whole = m(feats, with_loss=False, histogram=True)
        monkeypatch.setattr(vpot, "_PAIRS_PER_CHUNK", 5)
        runs = m(feats, with_loss=False, histogram=True)
        dense = m.weights(m.samples(feats)) @ m.prototypes
    torch.testing.assert_close(runs["yhat"], whole["yhat"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(runs["histogram"], whole["histogram"], rtol=1e-10, atol=1e-12)
    y = dense.view(12, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(runs["yhat"], unvague_ref(y), rtol=1e-8, atol=1e-10)


def test_short_lists_need_frozen_kernel_prototypes_and_sensible_counts():
    assert VPOTConfig(num_prototypes=12288, list_size=96).lists == 128
    assert VPOTConfig(num_prototypes=300, list_size=96, probes=4).lists == 0  # 4 lists, all probed: exact
    assert VPOTConfig(num_prototypes=40).lists == 0
    with pytest.raises(ConfigError, match="list_size must be an integer >= 0"):
        VPOTConfig(num_prototypes=40, list_size=-1).validate()
    # a prototype marginal (balanced OT) or the nearest prototype needs every prototype: no lists
    assert VPOTConfig(num_prototypes=40, list_size=10, ot_scope="batch").lists == 0
    assert VPOTConfig(num_prototypes=40, list_size=10, assignment="nearest").lists == 0
    m, feats = _short_list_module()
    m.train()
    with pytest.raises(RuntimeError, match="frozen prototypes"):
        m(feats)


def test_owners_are_the_majority_class_of_the_nearest_samples():
    torch.manual_seed(0)
    a = torch.randn(4, 3, 2, 2) * 0.1  # class 0 near the origin
    b = torch.randn(4, 3, 2, 2) * 0.1 + 5.0  # class 1 far away
    m = VaguePrototypes(VPOTConfig(num_prototypes=3, downsample=1, init="samples"), 3, 2)
    with torch.no_grad():
        m.prototypes.copy_(torch.tensor([[0.0, 0, 0], [5.0, 5, 5], [-40.0, -40, -40]]))
    m.set_owners(torch.cat([a, b]), torch.tensor([0] * 4 + [1] * 4), batch_size=3)
    assert m.owner.tolist() == [0, 1, -1]  # the third prototype is nobody's nearest


def test_batched_coreset_covers_as_well_as_exact_farthest_first():
    """The coverage radius (largest distance of a sample to its nearest chosen one) of the batched selection
    is within 25 % of exact farthest-first's (PatchCore's greedy_coreset) on clustered data, and the picks
    are distinct rows."""
    from vpdm.bench.patchcore import greedy_coreset
    from vpdm.model.vpot import coreset_index

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(40, 16, generator=g) * 5
    x = centres[torch.randint(40, (6000,), generator=g)] + torch.randn(6000, 16, generator=g) * torch.rand(
        6000, 1, generator=g
    )
    exact = greedy_coreset(x, 300, projection_dim=None)
    fast = coreset_index(x, 300, torch.Generator().manual_seed(1), batch=64)
    assert len(set(fast.tolist())) == 300

    def radius(idx):
        return float(torch.cdist(x, x[idx]).min(dim=1).values.max())

    assert radius(fast) <= 1.25 * radius(exact)
    assert radius(fast) < 0.9 * radius(torch.randperm(6000, generator=g)[:300])  # better than random rows


def test_short_lists_that_were_never_built_are_refused_not_read_as_empty():
    """Prototypes set by hand without build_lists(): the assignment says so instead of matching nothing."""
    m = VaguePrototypes(VPOTConfig(num_prototypes=40, downsample=1, list_size=4, probes=2, init="random"), 3, 4).eval()
    with pytest.raises(RuntimeError, match="never built"):
        m.weights(torch.randn(5, 3))
    m.build_lists(torch.Generator().manual_seed(0))
    assert torch.allclose(m.weights(torch.randn(5, 3)).sum(dim=1), torch.ones(5))


@pytest.mark.parametrize("init", ["kmeans", "coreset", "coreset_kmeans", "samples"])
@pytest.mark.parametrize("n", [1, 2])
def test_init_a_few_images_at_a_time_is_bit_for_bit_the_whole_tensors(monkeypatch, init, n):
    """Prototypes, owners and lists set up from SampleRows (the standardisation applied a few images at a
    time, a coreset's candidates gathered) equal those set up from the whole standardised tensor, with the
    candidate pool in use too."""
    import vpdm.model.vpot as vpot

    monkeypatch.setattr(vpot, "CORESET_CANDIDATES", 150)
    torch.manual_seed(0)
    feats = torch.randn(9, 3, 8, 8) * 2 + 1
    mean, std = feats.mean(dim=(0, 2, 3), keepdim=True), feats.std(dim=(0, 2, 3), keepdim=True)
    classes = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    modules = []
    for streamed in (False, True):
        m = _module(k=24, n=n, level="local", init=init, ot_scope="none", list_size=4, probes=2)
        if streamed:
            m.init_from(feats, torch.Generator().manual_seed(5), classes, transform=lambda x: (x - mean) / std)
        else:
            m.init_from((feats - mean) / std, torch.Generator().manual_seed(5), classes)
        modules.append(m)
    for name, value in modules[0].state_dict().items():
        assert torch.equal(value, modules[1].state_dict()[name]), name


def test_sample_rows_gather_any_rows_in_the_order_asked():
    from vpdm.model.vpot import SampleRows

    m = _module(k=3, n=2, level="local")
    feats = torch.randn(7, 3, 8, 8)
    rows = SampleRows(feats, m.samples, lambda x: x * 2, batch=3)
    whole = m.samples(feats * 2)
    assert rows.shape == tuple(whole.shape) and rows.per_image == 16
    torch.testing.assert_close(rows.materialise(), whole, rtol=0, atol=0)
    index = torch.tensor([111, 0, 5, 111, 47, 48, 16])
    torch.testing.assert_close(rows[index], whole[index], rtol=0, atol=0)


def _classes_apart(per_class_images=(5, 3, 4), channels=4, size=8, seed=0):
    """Images of three classes whose features lie far apart (class c around 6 c), one class index per image."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for c, n in enumerate(per_class_images):
        feats.append(torch.randn(n, channels, size, size, generator=g) + 6.0 * c)
        labels += [c] * n
    return torch.cat(feats), torch.tensor(labels)


def _per_class(k, **kw):
    config = VPOTConfig(
        num_prototypes=k, downsample=2, level="local", ot_scope="none", init="kmeans", per_class=True, **kw
    )
    return VaguePrototypes(config, 4, 8).eval()


def test_a_per_class_budget_gives_each_class_its_own_prototypes_at_most_its_samples():
    feats, labels = _classes_apart()
    m = _per_class(40, list_size=8, probes=2)
    m.init_from(feats, torch.Generator().manual_seed(0), labels)
    # class c holds min(40, its 16-sample images' blocks): 5 * 16 -> 40, 3 * 16 -> 40, 4 * 16 -> 40
    assert m.count == 120 and m.class_offsets.tolist() == [0, 40, 80, 120]
    assert torch.bincount(m.owner).tolist() == [40, 40, 40]
    small = _per_class(1000, list_size=0)
    small.init_from(feats, torch.Generator().manual_seed(0), labels)
    assert torch.bincount(small.owner).tolist() == [80, 48, 64]  # every block of the class, no repeats
    # each prototype lies among its own class's samples (classes 6 apart), and lists never mix classes
    for c in range(3):
        assert (m.prototypes[m.owner == c].mean() - 6.0 * c).abs() < 1.0
    owners_of_list = [set(m.owner[m.list_of == j].tolist()) for j in range(m.lists)]
    assert all(len(o) == 1 for o in owners_of_list)
    # class 0 alone: the same prototypes as beside the others (its draws come first in both)
    alone = _per_class(40, list_size=8, probes=2)
    alone.init_from(feats[:5], torch.Generator().manual_seed(0), labels[:5])
    torch.testing.assert_close(
        torch.sort(alone.prototypes.detach(), dim=0).values,
        torch.sort(m.prototypes[m.owner == 0].detach(), dim=0).values,
    )


@pytest.mark.parametrize("route, list_size", [(1, 8), (2, 8), (1, 0), (3, 8)])
def test_routed_assignment_grouped_equals_dense_and_stays_in_the_routed_classes(route, list_size):
    feats, labels = _classes_apart()
    m = _per_class(40, list_size=list_size, probes=3, route=route)
    m.init_from(feats, torch.Generator().manual_seed(0), labels)
    m, feats = m.double(), feats.double()  # the comparison is of the rule, not of rounding
    flat = m.samples(feats)
    weights = m.weights(flat)
    owner_weight = torch.stack([weights[:, m.owner == c].sum(dim=1) for c in range(3)], dim=1)
    image_class = labels.repeat_interleave(16)
    # the nearest class of every image is its own: all its weight stays there
    torch.testing.assert_close(
        owner_weight.gather(1, image_class.unsqueeze(1)).squeeze(1), torch.ones(len(flat), dtype=flat.dtype)
    )
    out = m(feats, with_loss=False, num_classes=3)
    dense = (weights @ m.prototypes).view(12, 4, 4, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(out["yhat"], unvague_ref(dense), rtol=1e-5, atol=1e-5)
    assert out["class_mass"].argmax(dim=1).tolist() == labels.tolist()
    # each image's weight on each class's prototypes (one route: read off the route, not summed)
    torch.testing.assert_close(out["class_mass"], owner_weight.view(12, 16, 3).mean(dim=1))
    # the training condition: its OT term is <w, C> + eps <w, log w> of the same weights
    y, terms = m.training_condition(feats)
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
    cost = m.cost(flat)
    expected = (weights * cost).sum(1) + m.config.ot_reg * (weights * weights.clamp_min(1e-30).log()).sum(1)
    torch.testing.assert_close(terms, expected.view(12, -1).mean(1), rtol=1e-4, atol=1e-5)
    # batch independence: an image alone gets what it gets in the batch
    torch.testing.assert_close(m(feats[7:8], with_loss=False)["yhat"], out["yhat"][7:8], rtol=1e-5, atol=1e-6)


def unvague_ref(y):
    return torch.nn.functional.interpolate(y, size=8, mode="bilinear", align_corners=False)


def test_a_per_class_state_dict_loads_into_a_fresh_module_of_the_same_settings():
    feats, labels = _classes_apart()
    m = _per_class(40, list_size=8, probes=2, route=1)
    m.init_from(feats, torch.Generator().manual_seed(0), labels)
    fresh = _per_class(40, list_size=8, probes=2, route=1)
    fresh.load_state_dict(m.state_dict())
    assert fresh.count == 120 and fresh.lists == m.lists
    torch.testing.assert_close(fresh(feats, with_loss=False)["yhat"], m(feats, with_loss=False)["yhat"])


def test_the_budget_per_class_and_routing_serve_the_kernel_only():
    """As short lists: balanced OT, the nearest assignment or random prototypes share one K, unrouted."""
    assert VPOTConfig().by_class and VPOTConfig().routes == 1
    for other in ({"ot_scope": "batch"}, {"assignment": "nearest"}, {"init": "random"}, {"per_class": False}):
        config = VPOTConfig(**other)
        assert not config.by_class and config.routes == 0
    with pytest.raises(ConfigError, match="prototypes.per_class must be true or false"):
        VPOTConfig(per_class="yes").validate()


@pytest.mark.parametrize("init", ["kmeans", "coreset", "coreset_kmeans", "samples"])
@pytest.mark.parametrize("n", [1, 2])
def test_streamed_init_is_the_rule_applied_to_the_whole_standardised_tensor(monkeypatch, init, n):
    """One shared K, no lists: the prototypes set up a few images at a time equal the rule written out on the
    whole standardised sample tensor (candidate pool, start rows, jitter, k-means), draw for draw."""
    import vpdm.model.vpot as vpot
    from vpdm.model.vpot import coreset_index, kmeans

    monkeypatch.setattr(vpot, "CORESET_CANDIDATES", 150)
    torch.manual_seed(0)
    feats = torch.randn(9, 3, 8, 8) * 2 + 1
    mean, std = feats.mean(dim=(0, 2, 3), keepdim=True), feats.std(dim=(0, 2, 3), keepdim=True)
    m = _module(k=24, n=n, level="local", init=init, ot_scope="none", list_size=0, per_class=False)
    m.init_from(feats, torch.Generator().manual_seed(5), transform=lambda x: (x - mean) / std)
    g = torch.Generator().manual_seed(5)
    flat = m.samples((feats - mean) / std)
    idx = coreset_index(flat, 24, g) if init.startswith("coreset") else torch.randperm(len(flat), generator=g)
    idx = idx.repeat(math.ceil(24 / len(idx)))[:24]
    start = flat[idx] + 0.01 * torch.randn(24, 3, generator=g)
    if init.endswith("kmeans"):
        start = kmeans(flat, start, m.config.kmeans_iters)
    assert torch.equal(m.prototypes.detach(), start)
