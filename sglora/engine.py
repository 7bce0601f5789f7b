"""Every LoRA-producing method behind one interface (paper §4.2).

zero-shot     no LoRA (all zeros)
model-soup    uniform mean of all expert means
adapter-soup  top-K experts, weight 1/K each
topk-weighted top-K experts, softmax weights alpha (= the prior mean mu*)
sg-lora       a CVAE sample z ~ p(z | c), c = {mu*, sigma*^2}
oracle        the task's own trained LoRA (evaluation only; needs the task's snapshots)

Merges average the flat [B, A] vectors, as the paper does, not the dense products B @ A;
with a shared A initialisation across experts (see training/experts.py) the factors stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expert_store.prior import mix, select_experts
from expert_store.repository import ExpertRepository
from models.backbone import Backbone
from models.cvae import CVAE

GENERATIVE_METHODS = ("sg-lora", "topk-weighted", "adapter-soup", "model-soup", "zero-shot")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ExpertChoice:
    name: str
    weight: float
    similarity: float


@dataclass(frozen=True)
class Generation:
    lora: torch.Tensor  # (P,) float32, on the CPU
    method: str
    seed: int | None
    top_k: int
    temperature: float
    experts: list[ExpertChoice] = field(default_factory=list)


class Engine:
    """Backbone + expert repository + generator: turns a description into a LoRA."""

    def __init__(
        self,
        backbone: Backbone,
        repository: ExpertRepository,
        generator: CVAE | None,
        top_k: int = 4,
        temperature: float = 0.1,
    ):
        if repository.spec.fingerprint() != backbone.spec.fingerprint():
            raise ValueError("the expert repository's LoRA layout does not match the backbone's")
        if repository.embed_dim != backbone.embed_dim:
            raise ValueError(
                f"the expert repository holds {repository.embed_dim}-d embeddings, the backbone makes {backbone.embed_dim}-d"
            )
        if generator is not None and generator.config.lora_dim != backbone.spec.num_params:
            raise ValueError(
                f"the generator makes {generator.config.lora_dim}-parameter LoRAs, the backbone takes {backbone.spec.num_params}"
            )
        self.backbone = backbone
        self.repository = repository
        self.generator = generator
        self.top_k = top_k
        self.temperature = temperature

    def embed(self, descriptions: list[str]) -> torch.Tensor:
        for d in descriptions:
            if not d or not d.strip():
                raise ValueError("description must not be empty")
        return self.backbone.encode_text(descriptions).cpu()

    def generate(
        self,
        embedding: torch.Tensor,
        method: str = "sg-lora",
        seed: int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """embedding (D,) of the task description -> a LoRA by ``method``."""
        top_k = self.top_k if top_k is None else top_k
        temperature = self.temperature if temperature is None else temperature
        if method not in GENERATIVE_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {GENERATIVE_METHODS}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}")
        means, variances, embeddings = self.repository.stacked()
        names = self.repository.names
        if method == "zero-shot":
            return Generation(torch.zeros(means.shape[1]), method, None, top_k, temperature)
        if method == "model-soup":
            w = 1.0 / len(names)
            sims = torch.nn.functional.cosine_similarity(embedding.unsqueeze(0), embeddings, dim=-1)
            experts = [ExpertChoice(n, w, float(s)) for n, s in zip(names, sims, strict=True)]
            return Generation(means.mean(0), method, None, top_k, temperature, experts)
        idx, alpha, sims = select_experts(embedding, embeddings, top_k, temperature)
        if method == "adapter-soup":
            alpha = torch.full_like(alpha, 1.0 / len(idx))
        experts = [ExpertChoice(names[i], float(a), float(s)) for i, a, s in zip(idx.tolist(), alpha, sims, strict=True)]
        mu, var = mix(means[idx], variances[idx], alpha)
        if method in ("adapter-soup", "topk-weighted"):
            return Generation(mu, method, None, top_k, temperature, experts)
        if self.generator is None:
            raise ValueError("method 'sg-lora' needs a trained generator; these artefacts have none")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        g = torch.Generator().manual_seed(seed)
        dev = self.generator.x_mean.device
        lora = self.generator.sample(mu.to(dev), var.to(dev), generator=g).cpu()
        return Generation(lora, method, seed, top_k, temperature, experts)
