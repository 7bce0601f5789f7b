"""Expert LoRA training (paper §3.2.1): one LoRA per task, identical configuration for all tasks.

Every task starts from the same seeded initialisation (A shared, B = 0), so the
flattened [B, A] vectors of different tasks live in one comparable coordinate system,
which the repository's averages and the generator rely on. The frozen prefix of the
image tower runs once per image (cached features); only the adapted part runs per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from models.backbone import Backbone
from training.config import ExpertTrainingConfig
from training.data import Sample, TaskDataset, TaskInfo

# train_expert computes a task's Backbone.adapter_inputs once when they take at most this many bytes
# (the offline default's largest task: 30 MB), else per batch.
PRECOMPUTE_BYTES = 1 << 30


@dataclass
class SplitData:
    features: torch.Tensor  # (N, ...) cached frozen-prefix features
    texts: torch.Tensor  # retrieval: (N, D) caption embeddings; classification: (C, D) class prompt embeddings
    labels: torch.Tensor | None  # classification: (N,) class indices
    captions: list[str]
    inputs: torch.Tensor | None = None  # Backbone.adapter_inputs(features), when computed once for many steps

    @property
    def kind(self) -> str:
        return "retrieval" if self.labels is None else "classification"


@dataclass
class PreparedTask:
    info: TaskInfo
    train: SplitData
    test: SplitData


class FeatureCache:
    """Frozen-prefix features per sample, computed once (samples are shared by classification tasks)."""

    def __init__(self, backbone: Backbone, batch_size: int = 64):
        self.backbone = backbone
        self.batch_size = batch_size
        self._cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def features(self, samples: list[Sample], desc: str | None = None) -> torch.Tensor:
        todo = [s for s in samples if id(s) not in self._cache]
        # A bar inside a task loop (experts, evaluation) that clears itself: on a terminal only (disable=None),
        # where it redraws in place; in a log each one would leave its own lines for every task.
        bar = tqdm(total=len(todo), desc=desc or "image features", unit="img", leave=False, disable=None if todo else True)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            pixels = torch.stack([self.backbone.preprocess(s.load()) for s in chunk]).to(self.backbone.device)
            feats = self.backbone.image_features(pixels).cpu()
            for s, f in zip(chunk, feats, strict=True):
                self._cache[id(s)] = f
            bar.update(len(chunk))
        bar.close()
        return torch.stack([self._cache[id(s)] for s in samples])


def prepare_task(
    backbone: Backbone, dataset: TaskDataset, name: str, cache: FeatureCache, splits_needed: tuple[str, ...] = ("train", "test")
) -> PreparedTask:
    """Cached features and text embeddings of one task; splits not in ``splits_needed`` are left empty."""
    info = dataset.tasks[name]
    splits = {}
    for split in ("train", "test"):
        if split not in splits_needed:
            splits[split] = SplitData(torch.empty(0), torch.empty(0), None, [])
            continue
        samples = dataset.task_samples(name, split)
        feats = cache.features(samples, desc=f"features {name}/{split}")
        if info.kind == "retrieval":
            captions = [s.caption or "" for s in samples]
            texts, labels = backbone.encode_text(captions).cpu(), None
        else:
            captions = [dataset.class_prompt(name, c) for c in info.classes]
            texts = backbone.encode_text(captions).cpu()
            index = {c: i for i, c in enumerate(info.classes)}
            labels = torch.tensor([index[s.label] for s in samples])
        splits[split] = SplitData(feats, texts, labels, captions)
    return PreparedTask(info, splits["train"], splits["test"])


def task_loss(
    backbone: Backbone, lora: torch.Tensor, feats: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """Symmetric CLIP loss for retrieval (texts (B, D) paired with feats), cross-entropy over class prompts otherwise."""
    return _loss(backbone, backbone.encode_image(feats, lora), texts, labels)


def _loss(backbone: Backbone, img: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    logits = backbone.logit_scale * img @ texts.to(img.device).T
    if labels is None:
        target = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return F.cross_entropy(logits, labels.to(img.device))


def batch_loss(backbone: Backbone, lora: torch.Tensor, data: SplitData, rows: torch.Tensor) -> torch.Tensor:
    """:func:`task_loss` on ``rows`` of a split: images paired with their own captions (retrieval) or scored
    against the task's class prompts (classification)."""
    inputs = data.inputs[rows] if data.inputs is not None else backbone.adapter_inputs(data.features[rows])
    img = backbone.encode_adapted(inputs, lora)  # (B, D)
    if data.labels is None:
        return _loss(backbone, img, data.texts[rows], None)
    return _loss(backbone, img, data.texts, data.labels[rows])


def train_expert(backbone: Backbone, task: PreparedTask, cfg: ExpertTrainingConfig, progress: bool = True) -> torch.Tensor:
    """Trains one task's LoRA; returns the flattened LoRAs of the last ``keep_last`` epochs, (M, P)."""
    g = torch.Generator().manual_seed(cfg.seed)
    vec = nn.Parameter(backbone.spec.init_vector(g).to(backbone.device))
    if cfg.train_a:
        opt = torch.optim.Adam([vec], lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:  # A stays at its initialisation: no gradient, and no weight decay either (Adam adds it in step())
        opt = torch.optim.Adam([vec], lr=cfg.lr)
        b_mask = backbone.spec.b_mask().to(vec.device)  # (P,) 1 on B entries, 0 on A
        wd = cfg.weight_decay
        vec.register_hook(lambda grad: (grad + wd * vec.detach() if wd else grad) * b_mask)  # Adam's own L2 term, on B
    n = len(task.train.features)
    if n < 2:
        raise ValueError(f"task {task.info.name!r} has {n} training samples; at least 2 are needed")
    data = task.train
    row_bytes = backbone.adapter_inputs(data.features[:1]).numel() * data.features.element_size()
    if n * row_bytes <= PRECOMPUTE_BYTES:  # else each batch computes its own (a large task at a large input size)
        data = dataclasses.replace(data, inputs=backbone.adapter_inputs(data.features))
    snapshots = []
    # Inside the experts stage's task bar: on a terminal only, as FeatureCache's (disable=None: off when not a TTY).
    epochs = tqdm(range(cfg.epochs), desc=f"expert {task.info.name}", unit="ep", leave=False, disable=None if progress else True)
    for epoch in epochs:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            if len(b) < 2 and data.labels is None:
                continue  # a contrastive batch of one has no negatives
            loss = batch_loss(backbone, vec, data, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(vec).all():
            raise ValueError(f"expert {task.info.name!r}: training diverged (NaN/Inf in the LoRA at epoch {epoch})")
        if epoch >= cfg.epochs - cfg.keep_last:
            snapshots.append(vec.detach().cpu().clone())
    return torch.stack(snapshots)
