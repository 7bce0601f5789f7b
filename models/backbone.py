"""The backbone interface: a frozen vision-language model with LoRA targets in its image tower.

Every backbone splits its image path in two: ``image_features`` is the frozen
prefix before the first adapted layer (cacheable: training many experts on the
same images runs it once), ``encode_image`` runs the adapted rest with an
optional flat LoRA and returns L2-normalised embeddings in the text space.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from models.lora import LoraApplier, LoraSpec
from models.packed import LONG_REDUCTION, has_packed, pack_linears, set_fixed_rows, unpack_linears
from sglora.devices import error_line

log = logging.getLogger("sglora.backbone")

BACKBONE_FILE = "backbone.json"
BACKBONE_KINDS = ("open_clip", "offline")


@dataclass(frozen=True)
class LoraConfig:
    """Where and how LoRAs attach; identical for every expert of an artefact set."""

    rank: int = 2  # paper: 2
    alpha: float = 2.0  # scale = alpha / rank ("standard") or alpha / sqrt(rank) ("rslora")
    scaling: str = "standard"
    # open_clip: which of Wq, Wk, Wv get an update; offline backbone: layer names (see its module).
    targets: tuple[str, ...] = ("q", "k", "v")
    # Indices of the adapted transformer blocks (negative counts from the end); None = all.
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if self.scaling not in ("standard", "rslora"):
            raise ValueError(f"lora.scaling must be 'standard' or 'rslora', got {self.scaling!r}")
        if not self.targets:
            raise ValueError("lora.targets must not be empty")


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen model to load.

    kind: "open_clip" (any open_clip model) or "offline" (MiniLM text + EfficientNet-Lite0 image, ConSE-aligned).
    model: open_clip architecture name ("ViT-B-16") or, with ``model_config``, a name for the custom one.
    pretrained: open_clip tag ("openai") or a local checkpoint path; None = random init (weights are saved).
    model_config: inline open_clip model config (embed_dim, vision_cfg, text_cfg) for tiny test models.
    quick_gelu: open_clip only: QuickGELU (x * sigmoid(1.702 x)) instead of GELU in the transformer MLPs.
        None = what the pretrained tag's weights were trained with (open_clip's pretrained config: True
        for 'openai'), else the architecture's default; an explicit value that contradicts the tag is
        refused. With ``model_config`` the activation is its ``quick_gelu`` key.
    seed: seed for random initialisation.
    """

    kind: str = "open_clip"
    model: str = "ViT-B-16"
    pretrained: str | None = None
    model_config: dict[str, Any] | None = None
    quick_gelu: bool | None = None
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in BACKBONE_KINDS:
            raise ValueError(f"backbone.kind must be one of {BACKBONE_KINDS}, got {self.kind!r}")
        if self.quick_gelu is not None and self.kind != "open_clip":
            raise ValueError(f"backbone.quick_gelu applies to open_clip models only, not kind {self.kind!r}")
        if self.quick_gelu is not None and self.model_config is not None:
            inline = bool(self.model_config.get("quick_gelu", False))
            if self.quick_gelu != inline:
                raise ValueError(
                    f"backbone.quick_gelu is {self.quick_gelu} but model_config.quick_gelu is {inline}: "
                    "set it in model_config only"
                )


GPU_TEXT_ROWS = 32  # see Backbone.text_rows
TRACE_WARM_RUNS = 2  # Backbone.trace_text: runs of the probes before the check
# Backbone.trace_text's own probes: "x" is one token to MiniLM's tokenizer, so with its two special tokens
# these fill the padded lengths 16 and 24 exactly (no padding: the eager tower then skips its attention mask).
TRACE_PROBES = ("x " * 14, "x " * 22)


# Loggers of the model libraries whose deprecated properties torch.jit.trace reads while it scans a module's
# attributes (sentence-transformers' `_target_device`, transformers' `loss_function`): each logs a warning
# that the service's own code never causes, at every start-up.
TRACE_NOISY_LOGGERS = ("sentence_transformers", "transformers")


@contextmanager
def _quiet(loggers: Sequence[str]) -> Iterator[None]:
    """Only errors from ``loggers`` (and their children) while the block runs."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, _ in saved:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, ...) -> (max(n, rows), ...), the last row repeated: how a fixed-shape pass is filled (the
    padding rows' outputs are dropped)."""
    n = x.shape[0]
    return x if rows <= n else torch.cat([x, x[-1:].expand(rows - n, *x.shape[1:])])


class Backbone(ABC):
    """A frozen text/image model whose image tower takes a flat LoRA."""

    config: BackboneConfig
    spec: LoraSpec
    embed_dim: int
    image_head: nn.Module  # forward(features) -> (N, D) unnormalised image embeddings; LoRA targets live here
    device: torch.device

    def __init__(self) -> None:
        self._applier: LoraApplier | None = None

    @property
    def applier(self) -> LoraApplier:
        if self._applier is None:
            self._applier = LoraApplier(self.image_head, self.spec)
        return self._applier

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) strings -> (N, D) L2-normalised embeddings."""

    def text_overflow(self, text: str) -> tuple[int, int] | None:
        """(tokens, context) where ``text`` is longer than the text tower reads (its tokenizer then cuts
        the rest off, so two texts alike up to there have one embedding); None where it fits or this
        backbone cannot tell."""
        context = self._text_context()
        if context is None or self._fits_untokenised(text, context):
            return None
        tokens = self._text_tokens(text)
        return (tokens, context) if tokens is not None and tokens > context else None

    def _fits_untokenised(self, text: str, context: int) -> bool:
        """Whether ``text`` certainly fits ``context`` tokens without tokenising it (a cheap bound); False:
        count its tokens."""
        return False

    def check_text_length(self, text: str) -> None:
        """ValueError where ``text`` is longer than the text tower reads (see :meth:`text_overflow`)."""
        if (over := self.text_overflow(text)) is not None:
            raise ValueError(
                f"is {over[0]} tokens long, and the text tower reads at most {over[1]} (its start and end tokens "
                "included): the rest would be cut off without changing anything; shorten it"
            )

    def _text_context(self) -> int | None:
        """How many tokens (special ones included) the text tower reads; None: unknown."""
        return None

    def _text_tokens(self, text: str) -> int | None:
        """How many tokens ``text`` is, special ones included, before any truncation; None: unknown."""
        return None

    def text_rows(self, n: int) -> int:
        """How many rows to run the text tower at for ``n`` descriptions: ``n`` on the CPU; on a GPU the
        next multiple of :data:`GPU_TEXT_ROWS`. GPU matrix libraries choose kernels (and so rounding)
        by shape: at a fixed number of rows a description's embedding does not depend on what it is
        batched with, and on a GPU the padding rows cost next to nothing."""
        if self.device.type == "cpu":
            return n
        return -(-n // GPU_TEXT_ROWS) * GPU_TEXT_ROWS

    text_dtype: torch.dtype = torch.float32
    _fingerprints: tuple[str, str] | None = None  # (fingerprint, legacy): the float32 tower's, kept by set_text_dtype

    def set_text_dtype(self, dtype: torch.dtype) -> None:
        """Runs the text tower in ``dtype``: float32 (as loaded) or bfloat16 (1.5-2x as fast on CPUs
        with bf16 dot products; embeddings come out float32 and within ~1e-4 in cosine). The image tower
        and everything stored in artefacts stay float32. One way: the float32 weights are not kept, so
        going back needs a fresh backbone. ValueError for other dtypes, that way back, or a backbone whose
        text tower cannot change its dtype."""
        if dtype == self.text_dtype:
            return
        if dtype != torch.bfloat16 or self.text_dtype != torch.float32:
            raise ValueError(f"the text tower runs in {self.text_dtype} and can only move to bfloat16, not {dtype}")
        fingerprints = self.fingerprints()
        self._text_graph = None  # traced with the old weights
        self._cast_text(dtype)
        self.text_dtype, self._fingerprints = dtype, fingerprints
        self._pack_text_here()

    def _pack_text_here(self) -> None:
        """On a CPU, packs the bfloat16 text tower's linear layers once (models/packed.py: the same bits as
        F.linear, faster); elsewhere, or where they are packed already, nothing."""
        linears = self._text_linears() if self.text_dtype == torch.bfloat16 else None
        if linears is None or self.device.type != "cpu" or has_packed(linears):
            return
        try:
            self._pack_text(linears, self.text_dtype)
        except RuntimeError as e:  # a build without the kernel: the plain layers still work
            log.warning("the text tower's linear layers stay unpacked: %s", e)

    def _text_linears(self) -> nn.Module | None:
        """The part of the text tower whose linear layers run packed for oneDNN once it is in bfloat16 on
        a CPU, and in fixed-row blocks where :meth:`set_text_fixed_rows` asks; None: none."""
        return None

    # The packed layers set_text_fixed_rows blocks: those with at least this many inputs (models/packed.py).
    text_blocked_min_features = LONG_REDUCTION

    def _pack_text(self, linears: nn.Module, dtype: torch.dtype) -> None:
        """Packs the layers of :meth:`_text_linears` (models/packed.py); RuntimeError where oneDNN cannot."""
        pack_linears(linears, dtype)

    def set_text_fixed_rows(self, rows: int | None) -> int:
        """Runs the text tower's long bfloat16 reductions in blocks of ``rows`` rows (None: one product),
        so that a description's embedding does not depend on what it is batched with where the CPU's
        kernels block those reductions by the number of rows (models/packed.py). Returns how many layers
        it changed: 0 where the text tower has none (float32, other backbones)."""
        linears = self._text_linears()
        n = 0 if linears is None else set_fixed_rows(linears, rows, self.text_blocked_min_features)
        self._text_fixed_rows = rows if n else None
        if n and self._text_graph is not None:  # the graph ran the products at the old block size
            why = self.trace_text(self._text_probes)
            if why:
                log.warning("the text tower runs eagerly: %s", why)
        return n

    @property
    def text_fixed_rows(self) -> int | None:
        """The block size :meth:`set_text_fixed_rows` set, or None."""
        return getattr(self, "_text_fixed_rows", None)

    # ---- the text tower as one traced graph ----------------------------------------------------------
    _text_graph: torch.jit.ScriptModule | None = None
    _text_probes: tuple[str, ...] = ()

    def trace_text(self, probes: Sequence[str]) -> str | None:
        """Runs the text tower's forward (after tokenising) as one TorchScript graph traced from it, where it
        gives every probe's embedding, alone and all of them in one batch, bit-identical to the eager forward.

        The graph runs the same torch ops with no Python between them: a lone description on one CPU core
        skips ~2.5 ms of module calls (MiniLM: 7.7 -> 5.2 ms), and the forward releases the GIL from start to
        end, so the event loop and a second model thread no longer wait on each other op by op
        (docs/benchmarks.md, release 0.9.17). The CPU only: on a GPU TorchScript may fuse operations, which
        round differently, after the check has run; and not where this torch build fuses on the CPU either.
        :data:`TRACE_PROBES` join ``probes`` (descriptions that fill their padded length exactly, where the
        eager tower may skip its attention mask and the graph does not). Returns None when the graph is in
        use, else why not (the tower then runs eagerly, as before). :meth:`set_text_dtype`, :meth:`to` and a
        deep copy drop the graph; :meth:`set_text_fixed_rows` traces it again."""
        self._text_graph, self._text_probes = None, tuple(probes)
        if not probes:
            return "no probe descriptions to check a traced graph with"
        if self.device.type != "cpu":
            return f"a traced graph runs on the CPU only, not on {self.device.type}"
        probes = [*probes, *TRACE_PROBES]
        with warnings.catch_warnings():  # torch.jit's deprecation notice, and the model code's tracer notes
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", getattr(getattr(torch, "jit", None), "TracerWarning", Warning))
            try:
                if torch._C._jit_can_fuse_on_cpu() or getattr(torch._C, "_jit_llga_enabled", lambda: False)():
                    return "this torch fuses CPU operations in TorchScript graphs, which would round differently"
                traced = self._text_module(probes[0])
                if traced is None:
                    return f"{type(self).__name__}'s text tower has no traceable forward"
                with torch.no_grad(), _quiet(TRACE_NOISY_LOGGERS):
                    graph = torch.jit.trace(*traced, check_trace=False)
            except Exception as e:  # an op or a Python construct the tracer cannot record; a torch without torch.jit
                return f"tracing failed ({error_line(e)})"
        try:
            eager = self._probe_embeddings(probes)
            self._text_graph = graph
            for _ in range(TRACE_WARM_RUNS):  # TorchScript's executor optimises a graph after its first runs
                self._probe_embeddings(probes)
            traced_embeddings = self._probe_embeddings(probes)
        except Exception as e:  # the graph fails at a shape it was not traced at, or memory ran out
            self._text_graph = None
            return f"checking the traced graph failed ({error_line(e)})"
        for probe, a, b in zip([*probes, "(all of them in one batch)"], eager, traced_embeddings, strict=True):
            if not torch.equal(a, b):
                self._text_graph = None
                diff = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(b.shape)} against {tuple(a.shape)}"
                return f"the traced graph's embedding of {probe!r} differs from the eager one (largest difference {diff})"
        return None

    def __deepcopy__(self, memo: dict) -> Backbone:
        # Without the graph: a copied ScriptModule would hold copies of the weights of its own, not the copy's
        # (the tower twice in memory, and blind to any change of the copy's weights).
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            setattr(copied, name, None if name == "_text_graph" else copy.deepcopy(value, memo))
        return copied

    @property
    def text_graph(self) -> str:
        """How the text tower runs: 'traced' (one TorchScript graph, :meth:`trace_text`) or 'eager'."""
        return "eager" if self._text_graph is None else "traced"

    def _probe_embeddings(self, probes: Sequence[str]) -> list[torch.Tensor]:
        return [*(self.encode_text([p]) for p in probes), self.encode_text(list(probes))]

    def _text_module(self, text: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]] | None:
        """A module running the text tower's forward on tensors (what :meth:`encode_text` hands the tower after
        tokenising and padding), and such tensors for ``text``, for :meth:`trace_text`; None: no such module."""
        return None

    @property
    def text_dtype_name(self) -> str:
        """``text_dtype`` as SGLORA_TEXT_DTYPE, the cache key and the LoRA metadata spell it: 'float32' or 'bfloat16'."""
        return str(self.text_dtype).removeprefix("torch.")

    def _cast_text(self, dtype: torch.dtype) -> None:
        raise ValueError(f"{type(self).__name__} runs its text tower in float32 only")

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (C, H, W) float tensor ready for :meth:`image_features`."""

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen prefix of the image tower: (N, C, H, W) -> cacheable features. Default: identity."""
        return pixels

    def encode_image(
        self, features: torch.Tensor, lora: torch.Tensor | None = None, spec: LoraSpec | None = None
    ) -> torch.Tensor:
        """Cached features (+ optional flat LoRA) -> (N, D) L2-normalised image embeddings. ``spec``: the LoRA's
        layout when it is not the backbone's (same targets, another rank: an exact merge, see
        :func:`models.lora.concat_merge`: a topk-exact or sg-lora-exact Generation's ``spec``)."""
        if lora is not None and spec is None and lora.dim() == 1 and lora.numel() != self.spec.num_params:
            raise ValueError(
                f"a {lora.numel()}-parameter LoRA does not fit this backbone's layout ({self.spec.num_params} "
                "parameters): pass the layout of an exact merge (topk-exact, sg-lora-exact) as spec=generation.spec; "
                "a LoRA made on other artefacts does not apply here"
            )
        applier = self.applier if spec is None or spec == self.spec else LoraApplier(self.image_head, spec)
        out = applier(lora, features.to(self.device))
        return nn.functional.normalize(out, dim=-1)

    def adapter_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """The part of the adapted forward that no LoRA changes, computed once per image for training:
        (N, ...) cached features -> (N, ...) inputs of :meth:`encode_adapted`. Default: the features."""
        return features.to(self.device)

    def encode_adapted(self, inputs: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_image` with the backbone's own LoRA layout from :meth:`adapter_inputs`; the same
        embeddings up to float rounding, differentiable in ``lora``. Default: :meth:`encode_image`."""
        return self.encode_image(inputs, lora)

    @property
    def logit_scale(self) -> float:
        """Temperature used by the contrastive / classification losses (CLIP's exp(logit_scale))."""
        return 100.0

    @abstractmethod
    def save(self, directory: Path) -> list[str]:
        """Writes what is needed to rebuild this backbone into ``directory``; returns the file names."""

    def fingerprint(self) -> str:
        """Hash of a few frozen weights, bit for bit: the image head's first and last parameters and the
        text tower's :meth:`_text_weights`. Detects artefacts built on another backbone, and is the same on
        every device and CPU (nothing is computed). Always the float32 tower's (kept by :meth:`set_text_dtype`)."""
        return self.fingerprints()[0]

    def fingerprints(self) -> tuple[str, str]:
        """(:meth:`fingerprint`, the one artefacts written before release 0.9.6 recorded): the values an
        artefact's record may hold. The earlier one hashed a text embedding rounded to 4 decimals, whose
        last digit moves with a few ulps of difference in the forward (another device, CPU or kernel; 3
        in 30 random ViT-B-16 text towers when only the sequence length changed), so artefacts built on a
        GPU were refused on a CPU as built on other weights. It is computed once, for the check alone."""
        if self._fingerprints is None:
            params = list(self.image_head.parameters())
            head = [_weight_bytes(p) for p in (params[0], params[-1])]
            current, legacy = hashlib.sha256(b"weights"), hashlib.sha256()
            for b in head:
                current.update(b)
                legacy.update(b)
            for p in self._text_weights():
                current.update(_weight_bytes(p))
            legacy.update(self._fingerprint_text("a photo of a cat").float().cpu().numpy().round(4).tobytes())
            self._fingerprints = (current.hexdigest()[:16], legacy.hexdigest()[:16])
        return self._fingerprints

    def _text_weights(self) -> list[torch.Tensor]:
        """A few of the text tower's frozen weights, float32, for :meth:`fingerprint` (small ones: hashing
        a 100 MB token embedding would cost a second at every load)."""
        raise NotImplementedError

    def _fingerprint_text(self, text: str) -> torch.Tensor:
        """(1, D) the text embedding the legacy fingerprint hashed: :meth:`encode_text`'s. A backbone whose
        encoding changed in its last bits since (a faster path) keeps the earlier one here."""
        return self.encode_text([text])

    def to(self, device: str | torch.device) -> Backbone:
        """Moves the backbone to ``device``. A bfloat16 text tower's packed layers (CPU only) go back to
        plain ones before it leaves the CPU (their fixed-row blocks with them: they are for the CPU's kernels),
        and are packed again when it returns: the same weights."""
        device = torch.device(device)
        self._text_graph = None  # traced on the old device
        linears = self._text_linears() if self.text_dtype == torch.bfloat16 else None
        if linears is not None and device.type != "cpu" and unpack_linears(linears):
            self._text_fixed_rows = None
        self.device = device
        self.image_head.to(device)
        self._move(device)
        self._applier = None
        self._pack_text_here()
        return self

    @abstractmethod
    def _move(self, device: torch.device) -> None:
        """Moves the modules besides :attr:`image_head` (:meth:`to`)."""


def _weight_bytes(p: torch.Tensor) -> bytes:
    return p.detach().float().cpu().contiguous().numpy().tobytes()


def create_backbone(config: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    """Builds the backbone a config names (weights from its pretrained source or a seeded random init)."""
    if config.kind == "open_clip":
        from models.open_clip_backbone import OpenClipBackbone

        return OpenClipBackbone.create(config, device=device)
    from models.offline_backbone import OfflineBackbone

    return OfflineBackbone.create(config, device=device)


def describe_backbone(config: BackboneConfig) -> str:
    """One line on what :func:`create_backbone` would build from ``config``, checked without loading
    pretrained weights; ValueError (or ImportError) naming what is wrong."""
    if config.kind == "open_clip":
        from models.open_clip_backbone import describe_config
    else:
        from models.offline_backbone import describe_config
    return describe_config(config)


def load_backbone(directory: Path, config: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    """Rebuilds a backbone from an artefact's ``backbone/`` folder written by :meth:`Backbone.save`."""
    if config.kind == "open_clip":
        from models.open_clip_backbone import OpenClipBackbone

        return OpenClipBackbone.load(directory, config, device=device)
    from models.offline_backbone import OfflineBackbone

    return OfflineBackbone.load(directory, config, device=device)
