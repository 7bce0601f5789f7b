"""Every LoRA-producing method behind one interface (paper §4.2).

zero-shot     no LoRA (all zeros)
model-soup    uniform mean of all expert means
adapter-soup  top-K experts, weight 1/K each
topk-weighted top-K experts, softmax weights alpha (= the prior mean mu*)
topk-exact    the same experts and weights, merged exactly: sum_k alpha_k scale B_k A_k, a rank-K*r LoRA
              (not in the paper; the merges above average the flat [B, A] vectors as the paper does)
sg-lora-exact the sg-lora sample's correction of its prior mean, on top of the exact merge instead of
              the [B, A] one: dW = sum_k alpha_k dW_k + dW(sample) - dW(mu*), a rank-(K+2)*r LoRA (not in
              the paper; the same seed gives the same sample as sg-lora)
sg-lora       a CVAE sample z ~ p(z | c), c = {mu*, sigma*^2} (and the description embedding d*, for a
              generator trained with generator.condition_on_description; not in the paper)
oracle        the task's own trained LoRA (evaluation only; needs the task's snapshots)

Merges average the flat [B, A] vectors, as the paper does, not the dense products B @ A;
with a shared A initialisation across experts (see training/experts.py) the factors stay comparable.
topk-exact and sg-lora-exact merge the updates exactly: their Generation carries its own (higher-rank) spec.
"""

from __future__ import annotations

import numbers
import operator
import threading
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from expert_store.prior import check_temperature, cosine_similarities, mix, select_experts, unit_rows
from expert_store.repository import ExpertRepository
from models.backbone import Backbone, pad_rows
from models.cvae import CVAE
from models.lora import LoraSpec, concat_merge
from models.packed import split_large
from sglora.methods import EQUAL_WEIGHT_METHODS, EVERY_EXPERT_METHODS, GENERATIVE_METHODS, SAMPLING_METHODS

MAX_SEED = 2**63 - 1
# Rows of a CVAE pass (Engine.pass_rows). A matrix product's rounding may depend on its number of rows
# (with F.linear on one AVX-512 host a row rounds one way alone, another among 2-3 rows and a third among 4
# or more, whatever the other rows hold), so a row's LoRA would depend on its batch if a pass simply took
# the batch. On the CPU the engine samples with the generator's oneDNN copy (CVAE.packed: weights
# reordered once, not repacked per call) and checks on first use the fewest rows from which on every pass
# of up to MAX_PASS_ROWS rows gives each row the same bits (on that host: 2; 1 would need the one-row
# kernel to round like the others). If that is at most MAX_PAD_ROWS, a batch's sg-lora rows share passes of
# up to MAX_PASS_ROWS, a smaller remainder padded to the fewest. A pass reads the generator's P x H weight
# blocks once (8 MiB on the offline default), so a lone request pays about what one row would, and a full
# pass a fraction of a row's cost per row. Passes of 32 rows made no more throughput but answered in bursts
# twice as long, which cache hits then wait behind (docs/benchmarks.md). On a GPU every pass has
# MAX_PASS_ROWS rows (padded on the device) where the same check passes at that size: a pass there costs
# about the same at 1 or 16 rows, and one shape means one kernel choice; on the H200, with the ViT-B-16
# shape, 32 clients made 26 % more misses per second than with one row per pass, and a lone miss took as
# long (docs/benchmarks.md). Elsewhere passes have one row.
MAX_PAD_ROWS = 4
MAX_PASS_ROWS = 16
# What the engine keeps per state of the repository (ExpertRepository.derived): the experts' unit embeddings
# (every request's similarities) and model-soup's LoRA, the means' mean.
UNIT_ROWS, MODEL_SOUP = "unit_rows", "mean_of_means"


@dataclass(frozen=True)
class ExpertChoice:
    name: str
    weight: float
    similarity: float


@dataclass(frozen=True)
class Request:
    """One generation: ``method`` and the optional knobs (None: the engine's defaults; a drawn seed)."""

    method: str = "sg-lora"
    seed: int | None = None
    top_k: int | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class Generation:
    lora: torch.Tensor  # (P,) float32, on the CPU
    method: str
    seed: int | None
    top_k: int  # experts mixed: every expert for model-soup, none (0) for zero-shot
    temperature: float | None  # None: the method weighs its experts equally (the soups), no softmax
    experts: list[ExpertChoice] = field(default_factory=list)
    spec: LoraSpec | None = None  # the LoRA's layout when not the backbone's (rank K*r, or (K+2)*r)
    generator_dtype: str = ""  # what the CVAE sampled in ("float32", "bfloat16"); "" for the methods that do not sample


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
        if generator is not None and generator.config.description_dim not in (0, backbone.embed_dim):
            raise ValueError(
                f"the generator is conditioned on {generator.config.description_dim}-d description embeddings, "
                f"the backbone makes {backbone.embed_dim}-d"
            )
        self.backbone = backbone
        self.repository = repository
        self.generator = generator
        # What samples: on the CPU the generator's oneDNN copy (see MAX_PASS_ROWS), else the generator.
        self.sampler = None if generator is None else (generator.packed() or generator)
        self.generator_dtype = torch.float32  # what the sampler's products run in (set_generator_dtype)
        self.top_k = top_k
        self.temperature = temperature
        # (a weak reference to the repository's stacked means, the generator's mean_features of them):
        # brought up to date when the repository changes (stacked() then returns new tensors), from the rows
        # kept per expert. Weak: a kept value must not keep a stack of a former state alive (E x P floats).
        self._features: tuple[weakref.ref, torch.Tensor] | None = None
        self._feature_rows: dict[int, torch.Tensor] = {}  # ExpertRepository.row_keys -> (1, H)
        self._features_lock = threading.Lock()
        self._pass_rows: tuple[int, int] | None = None  # see pass_rows

    def set_generator_dtype(self, dtype: torch.dtype) -> None:
        """Samples with the generator's oneDNN copy in ``dtype``: float32 (as loaded) or bfloat16 (half
        the weight bytes a CVAE pass reads; samples within ~2e-3 relative of float32's). The pass rows
        are checked again on first use. ValueError where that is not possible (no generator, not on a
        CPU, no oneDNN kernels for ``dtype``). Call it before generating, from one thread."""
        if dtype == self.generator_dtype:
            return
        if self.generator is None:
            raise ValueError("these artefacts have no generator")
        sampler = self.generator.packed(dtype) or (self.generator if dtype == torch.float32 else None)
        if sampler is None:
            raise ValueError(f"the generator cannot sample in {dtype} here (it needs a CPU with oneDNN kernels for it)")
        self.sampler, self.generator_dtype, self._pass_rows = sampler, dtype, None

    def split_sampler(self) -> int:
        """Runs the packed sampler's layers of at least :data:`models.packed.SPLIT_MIN_BYTES` (a large LoRA's
        P x H layers) as two blocks of outputs on two threads, where they give the whole layers' bits
        (:func:`models.packed.split_large`: two cores read a lone pass's weights); returns how many. For a
        service, after :meth:`set_generator_dtype`; the pass rows are checked again on first use."""
        if self.sampler is None or self.sampler is self.generator:  # not a packed copy: nothing to split
            return 0
        n = split_large(self.sampler)
        if n:
            self._pass_rows = None
        return n

    @property
    def generator_dtype_name(self) -> str:
        """``generator_dtype`` as SGLORA_GENERATOR_DTYPE, the cache key and the LoRA metadata spell it."""
        return str(self.generator_dtype).removeprefix("torch.")

    def embed(self, descriptions: list[str], *, truncate: bool = False) -> torch.Tensor:
        """A list of N descriptions -> (N, D) float32 text embeddings, on the CPU (``embed([text])[0]``: one
        description's (D,) row, what :meth:`generate` takes). A lone string is refused (TypeError) rather
        than read as a list of its characters, and a description longer than the text tower reads
        (ValueError naming it) rather than cut off, since two alike up to there would have one embedding;
        with ``truncate`` it is cut off as the tokenizer does (the service refuses such descriptions before
        they queue, and its batching probes run past the context on purpose)."""
        if isinstance(descriptions, str):
            raise TypeError("embed takes a list of descriptions, not a string: embed([description])[0] is its embedding")
        for i, d in enumerate(descriptions):
            if not isinstance(d, str):
                raise TypeError(f"a description is a string, not {type(d).__name__}")
            if not d.strip():
                raise ValueError("description must not be empty")
            if truncate:
                continue
            try:
                self.backbone.check_text_length(d)  # cheap: a short text is not tokenised to tell
            except ValueError as e:
                raise ValueError(f"descriptions[{i}] {e}") from None
        return self.backbone.encode_text(descriptions).cpu()

    def generate(
        self,
        embedding: torch.Tensor,
        method: str = "sg-lora",
        seed: int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """embedding (D,) of the task description (a row of :meth:`embed`) -> a LoRA by ``method``.
        ValueError naming what is wrong (the request's fields, the embedding's shape or size)."""
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 1:
            shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise ValueError(f"embedding must be one description's (D,) tensor, got {shape}: pass embed([description])[0]")
        out = self.generate_many(embedding.unsqueeze(0), [Request(method, seed, top_k, temperature)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def generate_many(self, embeddings: torch.Tensor, requests: list[Request]) -> list[Generation | ValueError]:
        """embeddings (B, D), one request each -> one Generation (or the ValueError naming what is wrong) each.

        Each row's result is the same bytes as that row alone (tests/test_engine.py checks it), so
        batching never changes a seeded LoRA: similarities and priors are computed per row, and the
        sg-lora rows share CVAE passes whose row count never changes a row's bits (:attr:`pass_rows`),
        each row with its own seeded generator.
        """
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a (B, D) torch.Tensor (embed's), got {type(embeddings).__name__}")
        if not isinstance(requests, list | tuple) or not all(isinstance(r, Request) for r in requests):
            raise TypeError("requests must be a list of sglora.engine.Request, one per row of the embeddings")
        if embeddings.dim() != 2 or embeddings.shape[0] != len(requests):
            raise ValueError(f"need one embedding row per request, got {tuple(embeddings.shape)} for {len(requests)}")
        if embeddings.shape[1] != self.repository.embed_dim:  # e.g. made by another artefact set's backbone
            raise ValueError(
                f"the embeddings are {embeddings.shape[1]}-d, this engine's experts {self.repository.embed_dim}-d: "
                "embed the descriptions with this engine (embed) or its backbone"
            )
        # In float32, as the similarities are worked out: a finite float64 row can overflow there (NaN weights and
        # a NaN LoRA), and a row of norm 0 or past float32's range has no direction (every similarity 0).
        # Such a row fails alone, as a bad request does.
        if not embeddings.is_floating_point():
            raise ValueError(f"the embeddings must be floating-point rows, got {embeddings.dtype}")
        norms = torch.linalg.vector_norm(embeddings.float(), dim=1)
        usable = (torch.isfinite(norms) & (norms > 0)).tolist()
        out: list[Generation | ValueError | None] = [None] * len(requests)
        resolved: list[tuple[str, int | None, int, float | None] | ValueError] = []
        for i, r in enumerate(requests):
            try:
                if not usable[i]:
                    raise ValueError(f"row {i} of the embeddings must have a finite, non-zero float32 norm")
                resolved.append(self._resolve(r))
            except ValueError as e:  # this request alone is bad (method, seed, top_k, temperature)
                resolved.append(e)
                out[i] = e
            else:
                if resolved[i][0] == "zero-shot":  # the frozen backbone: no expert read, none needed
                    out[i] = Generation(torch.zeros(self.backbone.spec.num_params), "zero-shot", None, 0, None)
        if all(o is not None for o in out):
            return out  # type: ignore[return-value]
        try:
            means, variances, stored = self.repository.stacked()
        except ValueError as e:  # an empty repository: the rows that need experts fail, zero-shot's stand
            return [e if o is None else o for o in out]  # type: ignore[misc]
        unit = self._unit_rows()
        names = self.repository.names
        sample_rows: list[tuple[int, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        exact_rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # sg-lora-exact: (means, alpha, mu*)
        # Each row alone (similarities, top-K, mixture): nothing here depends on the other rows.
        for i, row in enumerate(resolved):
            if out[i] is not None:  # refused, or zero-shot
                continue
            method, seed, top_k, temperature = row
            try:
                if method == "model-soup":
                    w = 1.0 / len(names)
                    sims = cosine_similarities(embeddings[i], unit)
                    experts = [ExpertChoice(n, w, s) for n, s in zip(names, sims.tolist(), strict=True)]
                    soup = self.repository.derived(
                        MODEL_SOUP, lambda m, v, e: m.mean(0)
                    ).clone()  # its own: callers may change it
                    out[i] = Generation(soup, method, None, top_k, temperature, experts)
                    continue
                # adapter-soup's weights are equal: the softmax (of any temperature) only ranks its experts
                t = self.temperature if temperature is None else temperature
                idx, alpha, sims = select_experts(embeddings[i], stored, top_k, t, unit)
            except ValueError as e:  # this request alone is bad (its top_k, temperature)
                out[i] = e
                continue
            if method == "adapter-soup":
                alpha = torch.full_like(alpha, 1.0 / top_k)
            experts = [ExpertChoice(names[k], a, s) for k, a, s in zip(idx.tolist(), alpha.tolist(), sims.tolist(), strict=True)]
            chosen = means.index_select(0, idx)  # the same rows as means[idx], a few times faster
            if method == "topk-exact":
                spec, lora = concat_merge(self.backbone.spec, chosen, alpha)
                out[i] = Generation(lora, method, None, top_k, temperature, experts, spec)
                continue
            mu, var = mix(chosen, variances.index_select(0, idx), alpha)
            if method not in SAMPLING_METHODS:
                out[i] = Generation(mu, method, None, top_k, temperature, experts)
                continue
            if method == "sg-lora-exact":
                exact_rows[i] = (chosen, alpha, mu)
            # .lora: the prior mean, for now
            out[i] = Generation(mu, method, seed, top_k, temperature, experts, generator_dtype=self.generator_dtype_name)
            # The condition layer's mu*-part as the same mix of the experts' precomputed parts: the CVAE
            # pass then reads one P x H weight block fewer (a third of its weights).
            sample_rows.append(
                (i, mu, var, seed, alpha @ self._expert_features(means).index_select(0, idx), embeddings[i].float())
            )
        fewest, most = self.pass_rows if sample_rows else (1, 1)
        for start in range(0, len(sample_rows), most):
            part = sample_rows[start : start + most]
            self._sample_chunk(out, part, max(fewest, len(part)))
        for i, (expert_means, alpha, mu) in exact_rows.items():  # out[i].lora: the sample
            spec, lora = concat_merge(
                self.backbone.spec,
                torch.cat([expert_means, torch.stack([out[i].lora, mu])]),
                torch.cat([alpha, torch.tensor([1.0, -1.0], dtype=alpha.dtype)]),
            )
            out[i] = replace(out[i], lora=lora, spec=spec)
        return out  # type: ignore[return-value]

    @property
    def pass_rows(self) -> tuple[int, int]:
        """(fewest, most) rows of a CVAE pass: on a CPU, the fewest row count from which on (at most
        :data:`MAX_PAD_ROWS`) every pass up to :data:`MAX_PASS_ROWS` rows agrees (:meth:`passes_agree`,
        checked once, on first use, with the torch threads then in effect) and :data:`MAX_PASS_ROWS`; on
        a GPU (MAX_PASS_ROWS, MAX_PASS_ROWS) where passes of that size agree in any row order; else (1, 1):
        one row per pass."""
        if self._pass_rows is None:
            rows = (1, 1)
            if self.sampler is not None and self.generator.x_mean.device.type == "cpu":
                fewest = next((f for f in range(1, MAX_PAD_ROWS + 1) if self.passes_agree(f)), None)
                if fewest is not None:
                    rows = (fewest, MAX_PASS_ROWS)
            elif self.sampler is not None and self.passes_agree(MAX_PASS_ROWS):
                rows = (MAX_PASS_ROWS, MAX_PASS_ROWS)
            self._pass_rows = rows  # one assignment: thread-safe
        return self._pass_rows

    def passes_agree(self, fewest: int, most: int = MAX_PASS_ROWS) -> bool:
        """Whether the sampler gives every row the same bits in a pass of any size from ``fewest`` to
        ``most`` rows, at any position: ``most`` priors mixed from the repository's experts, sampled in
        one pass, then every pass of ``fewest`` to ``most`` rows, in another order, compared with it."""
        means, variances, _ = self.repository.stacked()
        g = torch.Generator().manual_seed(0)
        priors = []
        for _ in range(most):  # random pairs of experts, random weights
            idx = torch.randint(0, len(means), (2,), generator=g)
            a = torch.rand((), generator=g)
            priors.append(mix(means[idx], variances[idx], torch.stack([a, 1 - a])))
        mu, var = (torch.stack(t) for t in zip(*priors, strict=True))
        feats = self.generator.mean_features(mu).cpu()
        dev = self.generator.x_mean.device
        d_dim = self.generator.config.description_dim
        desc = torch.nn.functional.normalize(torch.randn(most, d_dim, generator=g), dim=-1) if d_dim else None

        def sample(rows: list[int]) -> torch.Tensor:
            gens = [torch.Generator().manual_seed(r) for r in rows]
            d = None if desc is None else desc[rows].to(dev)
            return self.sampler.sample(
                mu[rows].to(dev), var[rows].to(dev), generator=gens, mean_features=feats[rows].to(dev), description=d
            )

        full = sample(list(range(most)))
        for n in range(fewest, most + 1):  # n == most: the same rows in another order
            rows = [(i + n // 2) % most for i in range(n)]
            if not torch.equal(sample(rows), full[rows]):
                return False
        return True

    def refresh(self) -> None:
        """Works out now what the engine keeps per state of the repository (its stack, the embeddings' unit
        rows, the generator's features of the experts), instead of in the first generation after a change.
        Call it where nothing generates meanwhile (a repository change's job)."""
        self._unit_rows()
        if self.generator is not None:
            self._expert_features(self.repository.stacked()[0])

    def _unit_rows(self) -> torch.Tensor:
        """The experts' embeddings as :func:`unit_rows`, once per state of the repository (not per request)."""
        return self.repository.derived(UNIT_ROWS, lambda m, v, e: unit_rows(e))

    def _expert_features(self, means: torch.Tensor) -> torch.Tensor:
        """The generator's :meth:`CVAE.mean_features` of every expert (E, H), on the CPU; kept for these
        ``means`` (any change to the repository stacks new tensors). After a change only the experts added
        are worked out (one P x H product each); the others' rows are kept by
        :meth:`ExpertRepository.row_keys`. Every row is computed alone, as ``mean_features`` does: the
        same bits whichever experts are around it."""
        cached = self._features
        if cached is not None and cached[0]() is means:
            return cached[1]
        with self._features_lock:  # two model threads after a change: one works the new rows out
            cached = self._features
            if cached is not None and cached[0]() is means:
                return cached[1]
            if means is not self.repository.stacked()[0]:  # not the repository's stack now: nothing to keep
                return self.generator.mean_features(means).cpu()
            keys = self.repository.row_keys()
            kept = self._feature_rows
            rows = {}
            for i, key in enumerate(keys):
                row = kept.get(key)
                rows[key] = row if row is not None else self.generator.mean_features(means[i : i + 1]).cpu()
            features = torch.cat([rows[k] for k in keys])
            self._feature_rows = rows  # the removed experts' rows go
            self._features = (weakref.ref(means), features)  # one assignment: a reader sees the old pair or the new one
        return features

    def _sample_chunk(
        self, out: list, rows: list[tuple[int, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]], size: int
    ) -> None:
        """One CVAE pass at exactly ``size`` rows (the last row repeated as padding; see :attr:`pass_rows`)."""
        n, dev = len(rows), self.generator.x_mean.device
        # Only the real rows travel to the device; the padding repeats the last one there.
        mu = pad_rows(torch.stack([r[1] for r in rows]).to(dev), size)
        var = pad_rows(torch.stack([r[2] for r in rows]).to(dev), size)
        feats = pad_rows(torch.stack([r[4] for r in rows]).to(dev), size)
        desc = pad_rows(torch.stack([r[5] for r in rows]).to(dev), size) if self.generator.config.description_dim else None
        gens = [torch.Generator().manual_seed(r[3]) for r in rows] + [torch.Generator() for _ in range(size - n)]
        # padding rows dropped
        loras = self.sampler.sample(mu, var, generator=gens, mean_features=feats, description=desc)[:n].cpu()
        for (i, *_), lora in zip(rows, loras):
            out[i] = replace(out[i], lora=lora)

    def _resolve(self, r: Request) -> tuple[str, int | None, int, float | None]:
        """A request with defaults filled in; ValueError naming the bad field. The default top_k is at most
        the number of experts (a repository edited since the engine was made may hold fewer)."""
        n = len(self.repository)
        top_k = min(self.top_k, n) if r.top_k is None else _integer(r.top_k, "top_k")
        temperature = self.temperature if r.temperature is None else r.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise ValueError(f"temperature must be a number, got {type(temperature).__name__}")
        # A numpy float32 0.1 is 0.10000000149011612 as a Python float, and was recorded so. Its shortest digits
        # are the number written, and the same float32 where the weights are worked out (a float32 softmax);
        # they are what weighs the experts and what is recorded.
        if isinstance(temperature, np.floating):  # its shortest digits, whatever numpy's print options
            temperature = float(np.format_float_scientific(temperature, unique=True))
        temperature = float(temperature)
        if r.method not in GENERATIVE_METHODS:
            raise ValueError(f"unknown method {r.method!r}; choose from {GENERATIVE_METHODS}")
        seed = None if r.seed is None else _integer(r.seed, "seed")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}")
        # A top_k or temperature given is checked for every method, as the service checks it: model-soup's
        # top_k of 99 (or 0) and its temperature of 0 were taken without a word because model-soup uses neither.
        if r.top_k is not None and not 1 <= top_k <= n:
            raise ValueError(f"top_k must be between 1 and the number of experts ({n}), got {top_k}")
        if r.temperature is not None:
            check_temperature(temperature)
        if r.method == "zero-shot":  # no LoRA: no expert mixed, no weights, no seed
            return r.method, None, 0, None
        if r.method in EVERY_EXPERT_METHODS:
            top_k = n
        if r.method in EQUAL_WEIGHT_METHODS:  # no softmax: no temperature recorded
            return r.method, None, top_k, None
        if r.method not in SAMPLING_METHODS:  # deterministic: no seed
            return r.method, None, top_k, temperature
        if self.generator is None:
            raise ValueError(f"method {r.method!r} needs a trained generator; these artefacts have none")
        seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        return r.method, seed, top_k, temperature


def _integer(value: object, name: str) -> int:
    """``value`` as a Python int (numpy and torch integers included); ValueError naming ``name`` for a
    bool, a float or anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
