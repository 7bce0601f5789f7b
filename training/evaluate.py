"""Evaluation (paper §4): Recall@1/5/10 both ways for retrieval tasks, accuracy for classification tasks.

Retrieval tasks also report ``image_cosine``, the mean cosine between the task's held-out image embeddings
(not in the paper): a LoRA that sends every image to one embedding scores 1.0 there, and chance at Recall@K."""

from __future__ import annotations

import torch

from models.backbone import Backbone
from models.lora import LoraSpec
from training.experts import PreparedTask

KS = (1, 5, 10)
RETRIEVAL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS)


def image_cosine(img: torch.Tensor) -> float:
    """Mean cosine similarity between distinct rows of ``img`` (N, D), N >= 2."""
    n = len(img)
    if n < 2:
        raise ValueError(f"image_cosine needs at least 2 embeddings, got {n}")
    unit = torch.nn.functional.normalize(img.float(), dim=-1)
    gram = unit @ unit.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def recall_at_k(sim: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """sim (N, N) image x text scores, pair i <-> i. Ties are broken at random, in expectation: with g items
    scoring above the true one and t others level with it, its rank is uniform on g..g+t, so it counts
    min(1, max(0, (k - g) / (t + 1))) towards Recall@k. (Counting only the items above would reward a LoRA
    that maps every image to one embedding with a perfect text->image score.)"""
    diag = sim.diagonal()
    out = {}
    for name, dim, own in (("i2t", 1, diag[:, None]), ("t2i", 0, diag[None, :])):
        above = (sim > own).sum(dim).float()
        level = (sim == own).sum(dim).float() - 1  # others tied with the true item
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * ((k - above) / (level + 1)).clamp(0, 1).mean().item()
    return out


def recall_at_k_reference(sim: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Reference of :func:`recall_at_k` (for tests): every order of the tied items, one row at a time."""
    n = sim.shape[0]
    out = {}
    for name, m in (("i2t", sim), ("t2i", sim.T)):
        hits = {k: 0.0 for k in ks}
        for i in range(n):
            row = m[i].tolist()
            above = sum(v > row[i] for v in row)
            positions = range(above, above + sum(v == row[i] for v in row))  # equally likely places of item i
            for k in ks:
                hits[k] += sum(p < k for p in positions) / len(positions)
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * hits[k] / n
    return out


@torch.no_grad()
def evaluate_lora(
    backbone: Backbone, task: PreparedTask, lora: torch.Tensor | None, batch_size: int = 256, spec: LoraSpec | None = None
) -> dict[str, float]:
    """``spec``: the LoRA's layout when it is not the backbone's (an exact merge's rank)."""
    data = task.test
    n = len(data.features)
    embs = [backbone.encode_image(data.features[i : i + batch_size], lora, spec) for i in range(0, n, batch_size)]
    img = torch.cat(embs).cpu()
    sim = img @ data.texts.T
    if data.labels is None:
        return {**recall_at_k(sim), "image_cosine": image_cosine(img)}
    return {"accuracy": 100.0 * (sim.argmax(1) == data.labels).float().mean().item()}
