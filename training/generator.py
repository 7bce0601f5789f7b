"""Generator training (paper §3.3.2): fit the CVAE on (snapshot, semantic prior of its task) pairs.

Training tasks are the non-expert tasks of the split; each task's prior comes from its
description embedding against the expert repository (top-K, softmax tau). With
``include_experts`` each expert also contributes its snapshots with a leave-one-out prior
built from the other experts. Validation tasks pick the best epoch.

With ``generator.task_weight`` > 0 (not in the paper) the loss also scores what the sampling path
makes: LoRAs drawn from p(z | c) for a few training tasks per step are applied to the backbone on
those tasks' training images, with the experts' own task loss. Eq. 9 alone only asks the decoder to
reconstruct snapshots in parameter space; this term asks the samples to work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from expert_store.prior import semantic_prior
from expert_store.repository import ExpertRepository
from models.backbone import Backbone
from models.cvae import CVAE, CVAEConfig
from training.config import GeneratorTrainingConfig, PriorConfig
from training.experts import SplitData, batch_loss


@dataclass
class GeneratorData:
    x: torch.Tensor  # (N, P) snapshots
    prior_mean: torch.Tensor  # (T, P) one prior per task
    prior_var: torch.Tensor  # (T, P)
    task_index: torch.Tensor  # (N,) row -> task
    descriptions: torch.Tensor | None = None  # (T, D) description embeddings (generator.condition_on_description)
    tasks: list[SplitData] | None = None  # task t's training split (for generator.task_weight > 0)

    def described(self, cfg: GeneratorTrainingConfig, t: torch.Tensor) -> torch.Tensor | None:
        """The description embeddings of tasks ``t`` when the generator is conditioned on them, else None."""
        if not cfg.condition_on_description:
            return None
        if self.descriptions is None:
            raise ValueError("generator.condition_on_description needs every task's description embedding")
        return self.descriptions[t]


def build_data(
    repo: ExpertRepository,
    tasks: dict[str, tuple[torch.Tensor, torch.Tensor]],
    prior: PriorConfig,
    leave_one_out: bool = False,
) -> GeneratorData:
    """tasks: name -> (snapshots (M, P), description embedding (D,))."""
    means, variances, embeddings = repo.stacked()
    names = repo.names
    xs, pms, pvs, idx, ds = [], [], [], [], []
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
        ds.append(emb.float())
    return GeneratorData(torch.cat(xs), torch.stack(pms), torch.stack(pvs), torch.cat(idx), torch.stack(ds))


def _sampled_task_loss(
    model: CVAE,
    backbone: Backbone,
    data: GeneratorData,
    tasks: list[int],
    images: int,
    g: torch.Generator | None,
    cfg: GeneratorTrainingConfig,
) -> torch.Tensor:
    """Mean task loss of one LoRA drawn from p(z | c) per task in ``tasks``, each on ``images`` of the
    task's training images (a random subset with ``g``; all of them, and z at the prior's mean, without)."""
    t = torch.tensor(tasks)
    eps = (
        torch.zeros(len(tasks), model.config.latent_dim)
        if g is None
        else torch.randn(len(tasks), model.config.latent_dim, generator=g)
    )
    loras = model.rsample(data.prior_mean[t], data.prior_var[t], eps, data.described(cfg, t))
    losses = []
    for lora, k in zip(loras, tasks, strict=True):
        split = data.tasks[k]
        n = len(split.features)
        b = torch.randperm(n, generator=g)[:images] if g is not None else torch.arange(n)
        losses.append(batch_loss(backbone, lora, split, b))
    return torch.stack(losses).mean()


def _scored_tasks(data: GeneratorData, cfg: GeneratorTrainingConfig) -> list[int]:
    """Indices of the tasks whose kind the task-loss term scores (generator.task_kinds)."""
    kinds = set(cfg.task_kinds)
    return [t for t, s in enumerate(data.tasks or []) if s.kind in kinds]


def _eval_loss(model: CVAE, data: GeneratorData, cfg: GeneratorTrainingConfig, backbone: Backbone | None) -> float:
    model.eval()
    # A fixed draw for the encoder's noise, so that epochs compare; fork_rng hands the training loop its own
    # stream back (seeding the global generator here made every epoch after the first draw the same noise).
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        t = data.task_index
        total, _, _ = model.loss(data.x, data.prior_mean[t], data.prior_var[t], data.described(cfg, t))
        scored = _scored_tasks(data, cfg) if cfg.task_weight > 0 else []  # train_generator checked the backbone
        if scored:
            total = total + cfg.task_weight * _sampled_task_loss(model, backbone, data, scored, 0, None, cfg)
    model.train()
    return float(total)


def train_generator(
    train: GeneratorData,
    val: GeneratorData | None,
    cfg: GeneratorTrainingConfig,
    progress: bool = True,
    backbone: Backbone | None = None,
) -> tuple[CVAE, list[dict]]:
    """Returns the CVAE (best validation epoch when ``val`` is given, else the last) and the loss history,
    which ends early when ``cfg.patience`` epochs pass without a better validation loss.
    ``backbone`` and ``train.tasks`` (and ``val.tasks``, for the validation loss) are needed when
    ``cfg.task_weight`` > 0."""
    if cfg.patience is not None and val is None:
        raise ValueError("generator.patience needs validation tasks (split.val > 0) to watch")
    use_tasks = cfg.task_weight > 0
    if use_tasks and (backbone is None or train.tasks is None or len(train.tasks) != len(train.prior_mean)):
        raise ValueError("generator.task_weight > 0 needs the backbone and every training task's training split")
    scored = _scored_tasks(train, cfg) if use_tasks else []
    if use_tasks and not scored:
        raise ValueError(
            f"generator.task_weight > 0 but no training task is of a kind in generator.task_kinds {list(cfg.task_kinds)}"
        )
    torch.manual_seed(cfg.seed)
    model = CVAE(
        CVAEConfig(
            lora_dim=train.x.shape[1],
            latent_dim=cfg.latent_dim,
            hidden_dim=cfg.hidden_dim,
            kl_weight=cfg.kl_weight,
            residual=cfg.residual,
            use_variance=cfg.use_variance,
            description_dim=train.described(cfg, torch.arange(1)).shape[1] if cfg.condition_on_description else 0,
        )
    )
    model.set_normalisation(train.x)
    if cfg.weight_decay > 0:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # The weights validated and returned: the model itself, or the exponential moving average of its weights.
    ema = None
    if cfg.ema_decay is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    kept = model if ema is None else ema.module
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(train.x)
    history: list[dict] = []
    best, best_state, best_epoch = float("inf"), None, -1
    bar = tqdm(range(cfg.epochs), desc="generator", unit="ep", disable=not progress)
    for epoch in bar:
        order = torch.randperm(n, generator=g)
        rec_sum = kl_sum = task_sum = prior_sum = 0.0
        steps = 0
        for i in range(0, n, cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            t = train.task_index[b]
            d = train.described(cfg, t)
            loss, rec, kl = model.loss(train.x[b], train.prior_mean[t], train.prior_var[t], d)
            if cfg.prior_path_weight > 0:
                eps = torch.randn(len(b), cfg.latent_dim, generator=g)
                drawn = model.rsample(train.prior_mean[t], train.prior_var[t], eps, d)
                pr = ((model.normalise(drawn) - model.normalise(train.x[b])) ** 2).mean()
                loss = loss + cfg.prior_path_weight * pr
                prior_sum += pr.item() * len(b)
            if use_tasks:
                picked = [scored[j] for j in torch.randperm(len(scored), generator=g)[: cfg.task_tasks].tolist()]
                tl = _sampled_task_loss(model, backbone, train, picked, cfg.task_images, g, cfg)
                loss = loss + cfg.task_weight * tl
                task_sum += tl.item()
                steps += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            rec_sum += rec.item() * len(b)
            kl_sum += kl.item() * len(b)
        row = {"epoch": epoch, "reconstruction": rec_sum / n, "kl": kl_sum / n}
        if use_tasks:
            row["task"] = task_sum / steps
        if cfg.prior_path_weight > 0:
            row["prior_path"] = prior_sum / n
        if val is not None:
            row["val_loss"] = _eval_loss(kept, val, cfg, backbone)
            if row["val_loss"] < best:
                best, best_state, best_epoch = row["val_loss"], copy.deepcopy(kept.state_dict()), epoch
        history.append(row)
        bar.set_postfix(  # shown at the bar's next redraw: refreshing here would bypass its minimum interval in a log
            rec=f"{row['reconstruction']:.4f}",
            kl=f"{row['kl']:.3f}",
            **({"task": f"{row['task']:.3f}"} if use_tasks else {}),
            refresh=False,
        )
        if cfg.patience is not None and epoch - best_epoch >= cfg.patience and epoch + 1 < cfg.epochs:
            tqdm.write(
                f"[generator] early stop after epoch {epoch}: no better validation loss for {cfg.patience} epochs "
                f"(best: epoch {best_epoch})"
            )
            break
    if not all(torch.isfinite(p).all() for p in kept.parameters()):
        raise ValueError("generator training diverged (NaN/Inf weights); lower generator.lr")
    if best_state is not None:
        kept.load_state_dict(best_state)
    kept.eval()
    return kept, history
