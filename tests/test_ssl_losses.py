"""Known-answer tests of the SSL objectives: InfoNCE, QSACL, MGCL pairing, Sinkhorn-Knopp and GCPL."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.ssl.augment import CropGeometry
from pipeline.ssl.contrastive import info_nce
from pipeline.ssl.gcpl import GCPLLoss, sinkhorn_knopp
from pipeline.ssl.mgcl import MGCLLoss, matched_cells
from pipeline.ssl.qsacl import QSACLLoss, QueryDecoder


def _orthogonal_minimum(n: int, t: float) -> float:
    """InfoNCE of identical orthogonal unit vectors: -log(e^{1/t} / (e^{1/t} + n - 1))."""
    return math.log(1 + (n - 1) * math.exp(-1 / t))


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_info_nce_orthogonal_identical_views_known_value(t: float) -> None:
    n = 6
    e = torch.eye(n) * 3.0  # scale is irrelevant: cosine similarity
    assert info_nce(e, e, t).item() == pytest.approx(_orthogonal_minimum(n, t), rel=1e-4, abs=1e-6)
    # Leading batch dims (one InfoNCE per query) give the same mean.
    assert info_nce(e.expand(4, n, n), e.expand(4, n, n), t).item() == pytest.approx(
        _orthogonal_minimum(n, t), rel=1e-4, abs=1e-6
    )


def test_info_nce_collapsed_is_log_n_and_identical_is_minimum() -> None:
    n = 8
    same = torch.ones(n, n)
    assert info_nce(same, same, 0.2).item() == pytest.approx(math.log(n), rel=1e-6)
    e = torch.eye(n)
    wrong = e.roll(1, dims=0)  # positives orthogonal, one negative aligned
    assert info_nce(e, e, 0.2) < info_nce(e, same, 0.2) < info_nce(e, wrong, 0.2)


def _query_vectors(B: int, m: int) -> torch.Tensor:
    """(B, m, B*m) one-hot: every (sample, query) vector orthogonal to every other."""
    return torch.eye(B * m).view(B, m, B * m)


def test_qsacl_known_minimum_and_query_pairing() -> None:
    B, m, t = 5, 4, 0.2
    z = _query_vectors(B, m)
    loss = QSACLLoss(temperature=t)
    identical = loss([z], [z], [z], [z])
    assert identical.item() == pytest.approx(_orthogonal_minimum(B, t), rel=1e-4, abs=1e-6)
    perm_q = torch.tensor([1, 2, 3, 0])
    shuffled = loss([z], [z], [z], [z[:, perm_q]])  # teacher local: queries permuted
    assert shuffled > identical + 0.5
    # Half the pairs (g vs l') see orthogonal positives: log B; the other half keep the minimum.
    assert shuffled.item() == pytest.approx(0.5 * (math.log(B) + _orthogonal_minimum(B, t)), rel=1e-4, abs=1e-6)


def test_qsacl_invariant_to_consistent_sample_permutation() -> None:
    torch.manual_seed(0)
    B, m, D = 6, 4, 8
    views = [torch.randn(B, m, D) for _ in range(6)]  # 1 global + 2 local, student and teacher
    loss = QSACLLoss(temperature=0.3)
    ref = loss(views[:1], views[1:3], views[3:4], views[4:6])
    p = torch.randperm(B)
    permuted = [v[p] for v in views]
    torch.testing.assert_close(loss(permuted[:1], permuted[1:3], permuted[3:4], permuted[4:6]), ref)
    # Without local crops: ordered pairs of distinct global crops.
    z = _query_vectors(B, m)
    assert loss([z, z], [], [z, z], []).item() == pytest.approx(_orthogonal_minimum(B, 0.3), rel=1e-4, abs=1e-6)


def test_query_decoder_shapes_masking_and_no_nan() -> None:
    torch.manual_seed(0)
    dec = QueryDecoder(in_dim=12, dim=16, num_queries=5, num_heads=2)
    feat = torch.randn(3, 12, 4, 4)
    valid = torch.ones(3, 4, 4, dtype=torch.bool)
    valid[1, :2] = False
    valid[2] = False  # nothing valid: attends to everything instead of NaN
    out = dec(feat, valid)
    assert out.shape == (3, 5, 16) and torch.isfinite(out).all()
    # Masked cells do not influence the result.
    feat2 = feat.clone()
    feat2[1, :, :2] = 100.0
    torch.testing.assert_close(dec(feat2, valid)[1], out[1])


def _one_hot_canvas(B: int, Hg: int, Wg: int) -> torch.Tensor:
    """(B, B*Hg*Wg, Hg, Wg): every (sample, source cell) has its own orthogonal feature."""
    return torch.eye(B * Hg * Wg).view(B * Hg * Wg, B, Hg, Wg).permute(1, 0, 2, 3)


def test_mgcl_pairs_cells_of_the_same_ground_across_rotated_views() -> None:
    B, G, t = 2, 6, 0.2
    canvas = _one_hot_canvas(B, G, G)
    ga = CropGeometry(torch.tensor([[0, 0], [1, 2]]), 4, torch.tensor([1, 6]), (G, G))
    gb = CropGeometry(torch.tensor([[2, 1], [0, 0]]), 4, torch.tensor([4, 3]), (G, G))
    fa = ga.crop(canvas[:, None], 1)[:, 0]  # (B, P, 4, 4) the features each view sees
    fb = gb.crop(canvas[:, None], 1)[:, 0]
    va = torch.ones(B, 4, 4, dtype=torch.bool)
    loss = MGCLLoss(temperature=t, max_pixels=10_000, region_size=2, min_region_fraction=0.25)
    pix, obj = loss.dense_terms(fa, va, ga, fb, va, gb, None)
    n_overlap = 2 * 3 + 3 * 2  # sample 0: rows 2-3 x cols 1-3; sample 1: rows 1-3 x cols 2-3
    assert pix.item() == pytest.approx(_orthogonal_minimum(n_overlap, t), rel=1e-4, abs=1e-6)
    # Regions: disjoint supports -> orthogonal region means; every 2x2 source block the overlap touches counts.
    _, _, both = matched_cells(fa, va, ga, fb, va, gb)
    n_regions = int((torch.nn.functional.avg_pool2d(both[:, None].float(), 2, divisor_override=1) > 0).sum())
    assert n_regions == 2 + 2  # sample 0: block row 1 x cols 0-1; sample 1: block rows 0-1 x col 1
    assert obj.item() == pytest.approx(_orthogonal_minimum(n_regions, t), rel=1e-4, abs=1e-6)
    # Mismatched geometry (teacher told the wrong transform) loses the pairing.
    gb_wrong = CropGeometry(gb.box, 4, (gb.transform + 1) % 8, (G, G))
    pix_wrong, _ = loss.dense_terms(fa, va, ga, fb, va, gb_wrong, None)
    assert pix_wrong > pix + 1.0


def test_sinkhorn_uniform_marginals() -> None:
    torch.manual_seed(0)
    N, K = 64, 8
    scores = torch.randn(N, K) * 3 + torch.linspace(0, 4, K)  # biased towards the last prototypes
    q = sinkhorn_knopp(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(N))
    torch.testing.assert_close(q.sum(0), torch.full((K,), N / K), atol=1e-3, rtol=1e-4)
    assert (q >= 0).all()
    q3 = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q3.sum(1), torch.ones(N))


def test_gcpl_prototypes_owned_and_updated_per_region() -> None:
    torch.manual_seed(0)
    loss = GCPLLoss(dim=8, num_regions=3, num_prototypes=4, momentum=0.5)
    before = loss.prototypes.clone()
    s = torch.randn(20, 8, requires_grad=True)
    region = torch.tensor([0] * 10 + [2] * 10)
    value = loss(s, s.detach() + 0.01 * torch.randn(20, 8), region)
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    moved = (loss.prototypes - before).norm(dim=-1)  # (regions, prototypes)
    assert (loss.prototypes[1] == before[1]).all()  # region 1 absent: untouched
    assert moved[0].max() > 0 and moved[2].max() > 0
    torch.testing.assert_close(loss.prototypes.norm(dim=-1), torch.ones(3, 4))
    loss.eval()
    frozen = loss.prototypes.clone()
    loss(s.detach(), s.detach(), region)
    assert torch.equal(loss.prototypes, frozen)
    loss.train()
    empty = loss(torch.zeros(0, 8), torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and torch.equal(loss.prototypes, frozen)
    with pytest.raises(ValueError, match="region ids"):
        loss(s, s, torch.full((20,), 3))
