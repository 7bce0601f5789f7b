import pytest
import torch

from training.evaluate import recall_at_k, recall_at_k_reference


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
