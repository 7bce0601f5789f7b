"""Evaluation (paper §4): Recall@1/5/10 both ways for retrieval tasks, accuracy for classification tasks."""

from __future__ import annotations

import torch

from models.backbone import Backbone
from models.lora import LoraSpec
from training.experts import PreparedTask

KS = (1, 5, 10)
RETRIEVAL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS)


def recall_at_k(sim: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """sim (N, N) image x text scores, pair i <-> i. Rank of the true item = number of items scoring higher."""
    diag = sim.diagonal()
    rank_i2t = (sim > diag[:, None]).sum(1)  # per image, texts scoring above its own caption
    rank_t2i = (sim > diag[None, :]).sum(0)  # per text, images scoring above its own image
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (rank_i2t < k).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (rank_t2i < k).float().mean().item()
    return out


def recall_at_k_reference(sim: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Full-sort reference of :func:`recall_at_k` (for tests)."""
    n = sim.shape[0]
    out = {}
    for name, m in (("i2t", sim), ("t2i", sim.T)):
        order = m.argsort(dim=1, descending=True)
        pos = [(order[i] == i).nonzero().item() for i in range(n)]
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * sum(p < k for p in pos) / n
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
        return recall_at_k(sim)
    return {"accuracy": 100.0 * (sim.argmax(1) == data.labels).float().mean().item()}
