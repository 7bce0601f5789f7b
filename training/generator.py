"""Generator training (paper §3.3.2): fit the CVAE on (snapshot, semantic prior of its task) pairs.

Training tasks are the non-expert tasks of the split; each task's prior comes from its
description embedding against the expert repository (top-K, softmax tau). With
``include_experts`` each expert also contributes its snapshots with a leave-one-out prior
built from the other experts. Validation tasks pick the best epoch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from expert_store.prior import semantic_prior
from expert_store.repository import ExpertRepository
from models.cvae import CVAE, CVAEConfig
from training.config import GeneratorTrainingConfig, PriorConfig


@dataclass
class GeneratorData:
    x: torch.Tensor  # (N, P) snapshots
    prior_mean: torch.Tensor  # (T, P) one prior per task
    prior_var: torch.Tensor  # (T, P)
    task_index: torch.Tensor  # (N,) row -> task


def build_data(
    repo: ExpertRepository,
    tasks: dict[str, tuple[torch.Tensor, torch.Tensor]],
    prior: PriorConfig,
    leave_one_out: bool = False,
) -> GeneratorData:
    """tasks: name -> (snapshots (M, P), description embedding (D,))."""
    means, variances, embeddings = repo.stacked()
    names = repo.names
    xs, pms, pvs, idx = [], [], [], []
    for t, (name, (snaps, emb)) in enumerate(tasks.items()):
        if leave_one_out and name in repo:
            keep = torch.tensor([n != name for n in names])
            m, v, e = means[keep], variances[keep], embeddings[keep]
        else:
            m, v, e = means, variances, embeddings
        p = semantic_prior(emb, e, m, v, min(prior.top_k, len(e)), prior.temperature)
        xs.append(snaps)
        pms.append(p.mean)
        pvs.append(p.variance)
        idx.append(torch.full((len(snaps),), t))
    return GeneratorData(torch.cat(xs), torch.stack(pms), torch.stack(pvs), torch.cat(idx))


def _eval_loss(model: CVAE, data: GeneratorData) -> float:
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        total, _, _ = model.loss(data.x, data.prior_mean[data.task_index], data.prior_var[data.task_index])
    model.train()
    return float(total)


def train_generator(
    train: GeneratorData, val: GeneratorData | None, cfg: GeneratorTrainingConfig, progress: bool = True
) -> tuple[CVAE, list[dict]]:
    """Returns the CVAE (best validation epoch when ``val`` is given, else the last) and the loss history."""
    torch.manual_seed(cfg.seed)
    model = CVAE(
        CVAEConfig(
            lora_dim=train.x.shape[1],
            latent_dim=cfg.latent_dim,
            hidden_dim=cfg.hidden_dim,
            kl_weight=cfg.kl_weight,
            residual=cfg.residual,
            use_variance=cfg.use_variance,
        )
    )
    model.set_normalisation(train.x)
    if cfg.weight_decay > 0:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(train.x)
    history: list[dict] = []
    best, best_state = float("inf"), None
    bar = tqdm(range(cfg.epochs), desc="generator", unit="ep", disable=not progress)
    for epoch in bar:
        order = torch.randperm(n, generator=g)
        rec_sum = kl_sum = 0.0
        for i in range(0, n, cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            t = train.task_index[b]
            loss, rec, kl = model.loss(train.x[b], train.prior_mean[t], train.prior_var[t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec_sum += rec.item() * len(b)
            kl_sum += kl.item() * len(b)
        row = {"epoch": epoch, "reconstruction": rec_sum / n, "kl": kl_sum / n}
        if val is not None:
            row["val_loss"] = _eval_loss(model, val)
            if row["val_loss"] < best:
                best, best_state = row["val_loss"], copy.deepcopy(model.state_dict())
        history.append(row)
        bar.set_postfix(rec=f"{row['reconstruction']:.4f}", kl=f"{row['kl']:.3f}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ValueError("generator training diverged (NaN/Inf weights); lower generator.lr")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history
