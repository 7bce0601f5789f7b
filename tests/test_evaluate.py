import pytest
import torch

from training.evaluate import image_cosine, recall_at_k, recall_at_k_reference


@pytest.mark.parametrize("n,seed", [(5, 0), (12, 1), (40, 2)])
def test_fast_recall_matches_full_sort_reference(n, seed):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n, n, generator=g) + 2 * torch.eye(n) * torch.rand(n, generator=g)
    fast, ref = recall_at_k(sim), recall_at_k_reference(sim)
    assert fast.keys() == ref.keys()
    for k in fast:
        assert fast[k] == pytest.approx(ref[k]), k


def test_perfect_and_reversed_rankings():
    assert recall_at_k(torch.eye(20))["i2t_r1"] == 100.0
    anti = -torch.eye(20)
    r = recall_at_k(anti)
    assert r["i2t_r1"] == 0.0 and r["t2i_r10"] == 0.0


def test_ties_count_as_a_random_order_not_as_wins():
    # Every image mapped to one embedding (a collapsed LoRA): each text sees N level images, so
    # text->image recall is chance (k / N), not 100 %; image->text is unaffected.
    texts = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    sim = torch.ones(12, 1) * texts[:1] @ texts.T  # (12 images, all equal) x 12 texts
    r = recall_at_k(sim)
    assert (
        r["t2i_r1"] == pytest.approx(100 / 12)
        and r["t2i_r5"] == pytest.approx(500 / 12)
        and r["t2i_r10"] == pytest.approx(1000 / 12)
    )
    ref = recall_at_k_reference(sim)
    for k in r:
        assert r[k] == pytest.approx(ref[k]), k
    partly = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.2, 0.5]])  # rows 0 and 2: one tie each
    assert recall_at_k(partly)["i2t_r1"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)


def test_image_cosine_flags_a_collapsed_embedding():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 16, generator=g)
    assert image_cosine(one.repeat(9, 1) * torch.rand(9, 1, generator=g)) == pytest.approx(1.0)  # one direction
    basis = torch.eye(6)
    assert image_cosine(basis) == pytest.approx(0.0)  # orthogonal
    pair = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert image_cosine(pair) == pytest.approx(2**-0.5)
    with pytest.raises(ValueError, match="at least 2"):
        image_cosine(one)
