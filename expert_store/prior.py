"""Semantic prior (paper eq. 6-8): top-K experts by cosine similarity, softmax weights, law of total variance."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# Softmax temperature of the expert weights: below ~1e-37 the scaled similarities overflow float32 and the
# weights become NaN; the range leaves orders of magnitude of room on both sides of any useful value.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """ValueError unless ``MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE`` (NaN and infinities included)."""
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"{name} must be between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {temperature}")


@dataclass(frozen=True)
class Prior:
    mean: torch.Tensor  # (P,) mu* = sum_k alpha_k mu_k
    variance: torch.Tensor  # (P,) sigma*^2 = sum_k alpha_k sigma_k^2 + sum_k alpha_k (mu_k - mu*)^2
    indices: torch.Tensor  # (K,) expert rows, most similar first
    weights: torch.Tensor  # (K,) alpha, sums to 1
    similarities: torch.Tensor  # (K,) cosine similarities of the chosen experts


def select_experts(
    query: torch.Tensor, embeddings: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query (D,), embeddings (E, D) -> (indices (K,), alpha (K,), similarities (K,)); ValueError naming a
    bad argument (shapes, top_k, temperature)."""
    if query.dim() != 1 or embeddings.dim() != 2 or query.shape[0] != embeddings.shape[1]:
        raise ValueError(
            f"need a query (D,) and expert embeddings (E, D), got {tuple(query.shape)} and {tuple(embeddings.shape)}"
        )
    check_temperature(temperature)
    n = embeddings.shape[0]
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"top_k must be an integer, got {top_k!r}")
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k must be between 1 and the number of experts ({n}), got {top_k}")
    sims = F.cosine_similarity(query.float().unsqueeze(0), embeddings.float(), dim=-1)  # (E,)
    top = torch.topk(sims, top_k)  # sorted, most similar first
    alpha = torch.softmax(top.values / temperature, dim=0)
    return top.indices, alpha, top.values


def mix(means: torch.Tensor, variances: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """means/variances (K, P), alpha (K,) -> (mu* (P,), sigma*^2 (P,)) by the law of total variance."""
    a = alpha.to(means.dtype)  # (K,)
    mu = a @ means  # one pass over the K rows (a (K,) x (K, P) product), not K scaled copies
    d = means - mu
    var = a @ variances + a @ d.mul_(d)  # d: the one (K, P) temporary
    return mu, var


def semantic_prior(
    query: torch.Tensor,
    embeddings: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    top_k: int = 4,
    temperature: float = 0.1,
) -> Prior:
    idx, alpha, sims = select_experts(query, embeddings, top_k, temperature)
    mu, var = mix(means[idx], variances[idx], alpha)
    return Prior(mu, var, idx, alpha, sims)
