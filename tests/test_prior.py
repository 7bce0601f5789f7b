import math

import pytest
import torch
from torch.nn import functional as F

from expert_store.prior import cosine_similarities, mix, select_experts, semantic_prior, unit_rows


def test_prior_matches_hand_computed_example():
    # Three experts in 2-d embedding space, query closest to expert 0 then 1.
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    q = torch.tensor([1.0, 0.0])
    means = torch.tensor([[1.0, 2.0], [3.0, 0.0], [100.0, 100.0]])
    var = torch.tensor([[0.5, 0.5], [1.0, 0.0], [9.0, 9.0]])
    p = semantic_prior(q, emb, means, var, top_k=2, temperature=0.5)
    # cos sims: 1.0 and 0.6 -> alpha = softmax([2.0, 1.2])
    a0 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.2))
    a1 = 1 - a0
    assert p.indices.tolist() == [0, 1]
    torch.testing.assert_close(p.weights, torch.tensor([a0, a1]))
    torch.testing.assert_close(p.similarities, torch.tensor([1.0, 0.6]))
    mu = torch.tensor([a0 * 1 + a1 * 3, a0 * 2 + a1 * 0])
    torch.testing.assert_close(p.mean, mu)
    # law of total variance: within + between
    within = torch.tensor([a0 * 0.5 + a1 * 1.0, a0 * 0.5 + a1 * 0.0])
    between = a0 * (means[0] - mu) ** 2 + a1 * (means[1] - mu) ** 2
    torch.testing.assert_close(p.variance, within + between)


def test_total_variance_equals_pooled_sample_variance():
    # Two experts with equal weight and equal snapshot counts: mix() is the variance of the pooled snapshots.
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g) + 2
    means = torch.stack([s1.mean(0), s2.mean(0)])
    variances = torch.stack([s1.var(0, unbiased=False), s2.var(0, unbiased=False)])
    mu, var = mix(means, variances, torch.tensor([0.5, 0.5]))
    pooled = torch.cat([s1, s2])
    torch.testing.assert_close(mu, pooled.mean(0))
    torch.testing.assert_close(var, pooled.var(0, unbiased=False), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    emb = torch.eye(3)
    with pytest.raises(ValueError, match="top_k"):
        select_experts(emb[0], emb, 4, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        select_experts(emb[0], emb, 2, 0.0)
    for bad in (1e-300, float("inf"), float("nan"), 2e6):  # below ~1e-37 the weights would be NaN
        with pytest.raises(ValueError, match="temperature must be between 1e-06 and 1e"):
            select_experts(emb[0], emb, 2, bad)
    for ok in (1e-6, 1e6):
        assert torch.isfinite(select_experts(emb[0], emb, 2, ok)[1]).all()


def test_shapes_and_a_non_integer_top_k_are_named():
    # A (1, D) query gave (1, K) indices and a prior of the wrong shape, silently; a query of another size was a
    # torch RuntimeError and a float top_k a TypeError from torch.topk.
    emb = torch.eye(3)
    for query, stored in ((emb[:1], emb), (torch.ones(4), emb), (emb[0], emb[0])):
        with pytest.raises(ValueError, match=r"need a query \(D,\) and expert embeddings \(E, D\)"):
            select_experts(query, stored, 1, 0.1)
    for bad in (2.0, True, "2"):
        with pytest.raises(ValueError, match="top_k must be an integer"):
            select_experts(emb[0], emb, bad, 0.1)
    assert select_experts(emb[0], emb, torch.tensor(2).item(), 0.1)[0].tolist() == [0, 1]


@pytest.mark.parametrize("dim", [1, 17, 384, 512])
def test_cosine_similarities_of_unit_rows_are_torchs_bits(dim):
    """The engine keeps the experts' unit rows and compares each query with them: the similarities, and so
    the weights and every LoRA, must stay F.cosine_similarity's to the bit (large and tiny norms included)."""
    g = torch.Generator().manual_seed(dim)
    for experts in (1, 2, 3, 8, 48, 144, 1000):
        for scale in (1e-12, 1e-3, 1.0, 1e4):
            rows = torch.randn(experts, dim, generator=g) * scale
            rows[0] = 0.0 if experts > 2 else rows[0]  # a zero row: divided by the eps, not by its norm
            query = torch.randn(dim, generator=g) * scale
            expected = F.cosine_similarity(query.unsqueeze(0), rows, dim=-1)
            assert torch.equal(cosine_similarities(query, unit_rows(rows)), expected), (experts, scale)
    top = select_experts(query, rows, 5, 0.1)
    kept = select_experts(query, rows, 5, 0.1, unit_rows(rows))
    assert all(torch.equal(a, b) for a, b in zip(top, kept, strict=True))


def test_unit_rows_of_strided_embeddings_and_of_another_shape():
    g = torch.Generator().manual_seed(1)
    rows, query = torch.randn(64, 96, generator=g), torch.randn(96, generator=g)
    strided = torch.randn(96, 64, generator=g).t()  # the same kind of rows, not contiguous
    strided.copy_(rows)
    assert torch.equal(cosine_similarities(query, unit_rows(strided)), cosine_similarities(query, unit_rows(rows)))
    with pytest.raises(ValueError, match=r"unit rows \(63, 96\) for embeddings \(64, 96\)"):
        select_experts(query, rows, 3, 0.1, unit_rows(rows[1:]))
