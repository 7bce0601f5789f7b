"""open_clip backbone: any ``open_clip`` model, LoRA on Wq/Wk/Wv of the visual transformer blocks.

open_clip's ``nn.MultiheadAttention`` keeps Wq, Wk, Wv fused in ``in_proj_weight`` (3d x d);
each gets its own rank-r update on its row block (paper: rank 2 on every visual block).
The PEFT names are those of HF ``CLIPModel`` (``vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj``).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from models.backbone import Backbone, BackboneConfig, pad_rows
from models.lora import LoraSpec, LoraTarget
from models.packed import pack_attention
from sglora.io import save_safetensors_file

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
QKV = ("q", "k", "v")
TEXT_LENGTH_STEP = 8  # the text tower runs a description at its length rounded up to a multiple of this
_TOKENIZER_LOCK = threading.Lock()  # the service encodes from several model threads


def qkv_target(block: int, which: str, width: int) -> LoraTarget:
    """The rank-r update of Wq, Wk or Wv (``which``) of visual block ``block``: its row block of the fused
    ``in_proj_weight`` (width x width), named as files name it, with the HF ``CLIPModel`` module of PEFT."""
    j = QKV.index(which)
    return LoraTarget(
        name=f"visual.transformer.resblocks.{block}.attn.{which}",
        param=f"transformer.resblocks.{block}.attn.in_proj_weight",
        rows=(j * width, (j + 1) * width),
        in_features=width,
        out_features=width,
        peft_module=f"vision_model.encoder.layers.{block}.self_attn.{which}_proj",
    )


def tag_quick_gelu(model: str, pretrained: str | None) -> bool | None:
    """Whether the weights of open_clip's pretrained tag ``pretrained`` for ``model`` were trained with
    QuickGELU; None when ``pretrained`` is not a known tag (no weights, or a checkpoint path)."""
    if not pretrained:
        return None
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    return bool(cfg.get("quick_gelu", False)) if cfg else None


def architecture_quick_gelu(model: str) -> bool:
    """The activation open_clip's built-in config ``model`` has by itself (True for the '-quickgelu' names)."""
    cfg = open_clip.get_model_config(model)
    return bool(cfg.get("quick_gelu", False)) if cfg else False


def resolve_quick_gelu(config: BackboneConfig) -> bool:
    """The activation a named open_clip model is built with: ``config.quick_gelu``, or by default the one
    its pretrained tag's weights need (else the architecture's); ValueError when the two contradict."""
    needed = tag_quick_gelu(config.model, config.pretrained)
    if config.quick_gelu is None:
        return architecture_quick_gelu(config.model) if needed is None else needed
    if needed is not None and config.quick_gelu != needed:
        act = "QuickGELU" if needed else "GELU"
        raise ValueError(
            f"backbone.quick_gelu is {config.quick_gelu}, but the {config.pretrained!r} weights of {config.model} were "
            f"trained with {act} (open_clip's pretrained config): set backbone.quick_gelu: {str(needed).lower()} or leave it out"
        )
    return config.quick_gelu


def lora_spec_for(visual: torch.nn.Module, config: BackboneConfig) -> LoraSpec:
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is None:
        raise ValueError(
            f"backbone: LoRA on Wq/Wk/Wv needs open_clip's ViT image tower (transformer.resblocks); {config.model}'s "
            f"image tower is a {type(visual).__name__}"
        )
    blocks = list(resblocks)
    n = len(blocks)
    odd = sorted({type(b.attn).__name__ for b in blocks if not isinstance(b.attn, nn.MultiheadAttention)})
    if odd:
        raise ValueError(
            f"backbone: LoRA on Wq/Wk/Wv needs nn.MultiheadAttention blocks (a fused in_proj_weight); {config.model}'s "
            f"image tower has {', '.join(odd)}"
        )
    chosen = range(n) if config.lora.blocks is None else sorted({b % n for b in config.lora.blocks})
    for b in config.lora.blocks or ():
        if not -n <= b < n:
            raise ValueError(f"lora.blocks: block {b} out of range for a {n}-block visual transformer")
    for t in config.lora.targets:
        if t not in QKV:
            raise ValueError(f"lora.targets: {t!r} is not one of {QKV} for an open_clip backbone")
    targets = []
    for i in chosen:
        width = blocks[i].attn.embed_dim
        for which in QKV:
            if which not in config.lora.targets:
                continue
            targets.append(qkv_target(i, which, width))
    return LoraSpec(targets=tuple(targets), rank=config.lora.rank, alpha=config.lora.alpha, scaling=config.lora.scaling)


def _activation_kwargs(config: BackboneConfig) -> dict:
    """``open_clip.create_model`` arguments for the activation :func:`resolve_quick_gelu` chooses."""
    quick_gelu = resolve_quick_gelu(config)
    # force_quick_gelu sets it before open_clip's tag check (no mismatch warning); GELU on a '-quickgelu'
    # architecture needs the constructor override.
    if quick_gelu:
        return {"force_quick_gelu": True}
    return {"quick_gelu": False} if architecture_quick_gelu(config.model) else {}


def _weights_source(config: BackboneConfig) -> str:
    """Where a named model's weights come from, in words; ValueError for a ``pretrained`` that is neither
    one of open_clip's tags for the model nor a file."""
    p = config.pretrained
    if p is None:
        return f"random init (seed {config.seed})"
    if open_clip.get_pretrained_cfg(config.model, p):
        return f"open_clip tag {p!r} (downloaded on first use unless cached)"
    if Path(p).is_file():
        return f"checkpoint {p}"
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(config.model)) or "none"
    raise ValueError(
        f"backbone.pretrained: {p!r} is neither an open_clip tag of {config.model} (tags: {tags}) nor a checkpoint file "
        "(a relative path in a config file is taken from the config's folder, else the current directory)"
    )


def block_activation(block: nn.Module) -> str | None:
    """The activation of an open_clip transformer block's MLP: "quick_gelu", "gelu" (exact), else None."""
    act = getattr(getattr(block, "mlp", None), "gelu", None)
    if isinstance(act, open_clip.transformer.QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return None


def mlp_activation(visual: nn.Module) -> str | None:
    """The activation of every MLP of an open_clip ViT tower ("quick_gelu" or "gelu"); None where it has no
    blocks, or they use another or differ. OpenAI's weights need QuickGELU, and a model built with GELU runs
    them without an error, only worse: the LoRA files name it, and merge_lora compares."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    acts = {block_activation(b) for b in blocks} if blocks is not None else set()
    return acts.pop() if len(acts) == 1 else None


def tower_geometry(visual: nn.Module) -> dict | None:
    """The depth and patch size of an open_clip ViT tower (``{"layers": 12, "patch_size": [16, 16]}``); None
    where it has no blocks. Width is checked by the LoRA tensors' shapes; these two are not: a LoRA of a
    ViT-B-32 fits a ViT-B-16 tensor for tensor, and one of a 2-block tower the first 2 blocks of a deeper
    one. The LoRA files name them, and merge_lora compares."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        return None
    geometry = {"layers": len(blocks)}
    if (patch := getattr(visual, "patch_size", None)) is not None:
        geometry["patch_size"] = [int(p) for p in (patch if isinstance(patch, tuple | list) else (patch, patch))]
    return geometry


def describe_config(config: BackboneConfig) -> str:
    """What :meth:`OpenClipBackbone.create` would build from ``config``, checked without weights (the
    architecture on the meta device): the model name, the weights' source, the activation and the LoRA
    targets. ValueError naming what is wrong. A model from the HF hub (``hf-hub:...``) is not checked."""
    if config.model_config is not None:
        if config.pretrained is not None:
            raise ValueError("backbone: give either model_config (random init) or pretrained, not both")
        try:
            with torch.device("meta"):
                model = open_clip.CLIP(**config.model_config)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"backbone.model_config: open_clip.CLIP cannot be built from it: {e}") from e
        source, act = f"random init (model_config, seed {config.seed})", config.model_config.get("quick_gelu", False)
    elif config.model.startswith("hf-hub:"):
        return f"open_clip {config.model}: from the HF hub, not checked offline"
    else:
        names = open_clip.list_models()
        if config.model not in names:
            close = difflib.get_close_matches(config.model, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (open_clip.list_models() lists them)"
            raise ValueError(f"backbone.model: open_clip has no model {config.model!r}{hint}")
        source, kwargs = _weights_source(config), _activation_kwargs(config)
        act = "force_quick_gelu" in kwargs or (architecture_quick_gelu(config.model) and not kwargs)
        quiet = logging.root.manager.disable  # open_clip warns that it initialised randomly: the point here
        logging.disable(logging.WARNING)
        try:
            with torch.device("meta"):
                model = open_clip.create_model(config.model, pretrained=None, device="meta", **kwargs)
        finally:
            logging.disable(quiet)
    spec = lora_spec_for(model.visual, config)
    if not isinstance(model, open_clip.CLIP):  # CoCa, or a custom (HF) text tower: no text_projection
        raise ValueError(
            f"backbone: {config.model} is an open_clip {type(model).__name__}; the open_clip backbone takes "
            "open_clip.CLIP models (the size of its text embeddings comes from CLIP's text projection)"
        )
    blocks = model.visual.transformer.resblocks
    return (
        f"open_clip {config.model} ({'QuickGELU' if act else 'GELU'}), weights: {source}; image tower: {len(blocks)} blocks "
        f"of width {blocks[0].attn.embed_dim}, {model.visual.output_dim}-d embeddings; LoRA: {len(spec.targets)} modules "
        f"({', '.join(config.lora.targets)}), rank {spec.rank}, {spec.num_params:,} parameters"
    )


class OpenClipBackbone(Backbone):
    def __init__(self, model: open_clip.CLIP, tokenizer, config: BackboneConfig, device: str | torch.device):
        super().__init__()
        self.config = config
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_head = self.model.visual
        self.spec = lora_spec_for(self.model.visual, config)
        self.activation = mlp_activation(self.model.visual)  # named in every LoRA file's metadata
        self.tower = tower_geometry(self.model.visual)  # so are the image tower's depth and patch size
        self.embed_dim = int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else 0
        image_size = self.model.visual.image_size
        self._transform = open_clip.image_transform(image_size, is_train=False)
        self.to(device)

    @classmethod
    def create(cls, config: BackboneConfig, device: str | torch.device = "cpu") -> OpenClipBackbone:
        if config.model_config is not None:
            if config.pretrained is not None:
                raise ValueError("backbone: give either model_config (random init) or pretrained, not both")
            torch.manual_seed(config.seed)
            model = open_clip.CLIP(**config.model_config)
            tokenizer = open_clip.SimpleTokenizer(context_length=config.model_config["text_cfg"].get("context_length", 77))
            return cls(model, tokenizer, config, device)
        torch.manual_seed(config.seed)
        try:
            model = open_clip.create_model(config.model, pretrained=config.pretrained, **_activation_kwargs(config))
        except RuntimeError as e:  # unknown model names and failed downloads both land here
            raise ValueError(f"backbone: cannot create open_clip model {config.model!r} ({config.pretrained}): {e}") from e
        return cls(model, open_clip.get_tokenizer(config.model), config, device)

    @classmethod
    def load(cls, directory: Path, config: BackboneConfig, device: str | torch.device = "cpu") -> OpenClipBackbone:
        cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.exists():
            # Pretrained from a tag or checkpoint outside the artefact: rebuild from the source.
            return cls.create(config, device)
        model_cfg = json.loads(cfg_path.read_text())["model_cfg"]
        model = open_clip.CLIP(**model_cfg)
        model.load_state_dict(load_file(str(weights)), strict=True)
        tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))
        return cls(model, tokenizer, config, device)

    def save(self, directory: Path) -> list[str]:
        if self.config.model_config is None:
            return []  # weights come from the named pretrained source; backbone.json records it
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"model_cfg": self.config.model_config}, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_safetensors_file(state, directory / WEIGHTS_FILE)
        return [CONFIG_FILE, WEIGHTS_FILE]

    def _text_context(self) -> int | None:
        # open_clip's own BPE tokenizer, truncating (other reductions and HF tokenizers: not checked)
        tok = self.tokenizer
        if not isinstance(tok, open_clip.SimpleTokenizer) or tok.reduction_fn is not None:
            return None
        return int(tok.context_length)

    def _fits_untokenised(self, text: str, context: int) -> bool:
        # Its cleaning (ftfy, HTML unescaping, lower case) may lengthen a text (U+FB2C: 3 bytes, 6 tokens;
        # "&nGt;": 5 bytes, 6 once unescaped), so the bytes as given bound nothing in general. ASCII without
        # "&" it only shortens (ftfy's fixes act on non-ASCII, escapes and control characters; unescaping
        # needs "&"; ASCII's lower case is as long), and a BPE token takes at least one byte: at most
        # context - 2 such characters fit with the start and end tokens (a test checks 200,000 random ones
        # under all three of open_clip's cleanings). Most captions are such: each untokenised is ~40 us saved.
        return text.isascii() and "&" not in text and len(text) + 2 <= context

    def _text_tokens(self, text: str) -> int | None:
        # Counted where _fits_untokenised cannot tell. Pure Python (tens of microseconds for a description),
        # and without the lock the model threads take for HF tokenizers: none is used here.
        return len(self.tokenizer.encode(text)) + 2  # with the start and end tokens, as __call__ adds them

    @torch.no_grad()  # not inference_mode: text embeddings feed autograd graphs during training
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        with _TOKENIZER_LOCK:  # HF tokenizers (some open_clip models) fail when called from two threads at once
            tokens = self.tokenizer(list(texts))
        tokens = tokens.to(self.device)
        lengths = self._text_lengths(tokens)
        if lengths is None or not len(lengths):  # no descriptions: (0, D), as for any backbone
            return self._encoded(tokens)
        # Descriptions of one length bucket run together; each always at its own bucket's length, so its
        # embedding does not depend on the lengths of what it is batched with.
        out = None
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().squeeze(1)
            part = self._encoded(tokens[rows, :length])
            out = part.new_empty(tokens.shape[0], part.shape[1]) if out is None else out
            out[rows] = part
        return out

    def _encoded(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]  # on a GPU a fixed shape (Backbone.text_rows)
        return self._encode_tokens(pad_rows(tokens, self.text_rows(n)))[:n]

    @functools.cached_property
    def _clip_text(self) -> bool:
        """Whether the text tower is open_clip.CLIP's own (a text projection matrix), which this backbone
        runs itself; other models' encode_text runs as open_clip has it."""
        return isinstance(self.model, open_clip.CLIP) and isinstance(self.model.text_projection, torch.Tensor)

    def _text_weights(self) -> list[torch.Tensor]:
        m = self.model
        if self._clip_text:
            return [m.positional_embedding, m.ln_final.weight, m.ln_final.bias, m.text_projection]
        # Other text towers: the last four parameters of up to 1M values outside the image tower (not a
        # token embedding) but the logit scale and bias.
        text = [p for n, p in m.named_parameters() if not n.startswith(("visual.", "logit_")) and p.numel() <= 1 << 20]
        return text[-4:]

    @torch.no_grad()
    def _fingerprint_text(self, text: str) -> torch.Tensor:
        # The whole context, as releases before 0.9.6 ran every description: at its own length the values
        # differ in their last bits (within 1e-7), which can move one of the fingerprint's rounded values
        # (3 of 30 randomly initialised ViT-B-16-shaped text towers), and artefacts built before would be refused.
        with _TOKENIZER_LOCK:
            tokens = self.tokenizer([text])
        return self._encoded(tokens.to(self.device))

    def _text_lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(N,) the length each description's tokens are run at: up to its pooled (end-of-text) token,
        rounded up to a multiple of :data:`TEXT_LENGTH_STEP`; None where the tower needs the whole context.

        open_clip's CLIP text tower is causal and pools at the end-of-text token, so the padding after it
        never reaches the embedding: "a photo of a persian" ran all 77 positions of CLIP's context, on one
        CPU core 26 ms with ViT-B-16's text tower in bfloat16, 9 ms at 8 positions (docs/benchmarks.md).
        The values are the whole context's up to rounding (float32: within 1e-7)."""
        m = self.model
        if not self._causal_text:
            return None
        if m.text_pool_type == "argmax":
            ends = tokens.argmax(dim=-1)
        else:  # "eos"
            ends = (tokens == m.text_eos_id).int().argmax(dim=-1)
        step = TEXT_LENGTH_STEP
        return ((ends + 1 + step - 1) // step * step).clamp(max=tokens.shape[1])

    @functools.cached_property
    def _causal_text(self) -> bool:
        """Whether the text tower is open_clip's CLIP one with a causal mask and end-of-text pooling
        (what :meth:`_text_lengths` relies on)."""
        m = self.model
        if not self._clip_text:
            return False
        mask = getattr(m, "attn_mask", None)
        if mask is None or m.text_pool_type not in ("argmax", "eos"):
            return False
        if m.text_pool_type == "eos" and getattr(m, "text_eos_id", None) is None:
            return False
        n = mask.shape[-1]
        causal = torch.full((n, n), float("-inf"), device=mask.device).triu(1)
        return bool(torch.equal(mask.float(), causal))

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if not self._clip_text:
            return m.encode_text(tokens, normalize=True).float()
        if self._text_graph is not None:
            return self._text_graph(tokens)
        return _clip_text_forward(m, tokens)

    def _text_module(self, text: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]] | None:
        if not self._clip_text:
            return None
        with _TOKENIZER_LOCK:
            tokens = self.tokenizer([text]).to(self.device)
        lengths = self._text_lengths(tokens)
        if lengths is not None:
            tokens = tokens[:, : int(lengths[0])]
        return ClipTextForward(self.model), (tokens,)

    def _cast_text(self, dtype: torch.dtype) -> None:
        m = self.model
        if not isinstance(m, open_clip.CLIP):
            super()._cast_text(dtype)  # raises
        # The text tower of open_clip.CLIP: every module and parameter outside ``visual``. Its forward
        # runs in the transformer's weight dtype (get_cast_dtype); the LoRA targets stay float32.
        for name, child in m.named_children():
            if name != "visual":
                child.to(dtype)
        for name, param in m.named_parameters(recurse=False):
            if name != "logit_scale":
                param.data = param.data.to(dtype)

    def _text_linears(self) -> nn.Module | None:
        # The text blocks' MLP layers, packed: a lone description on ViT-B-16's tower 8.8 -> 6.9 ms on one
        # AVX512-BF16 core, the same bits. And the attention's projections (_pack_text).
        return self.model.transformer if self._clip_text else None

    # On an AMX core ViT-B-16's text tower also rounds a row of its 512-wide products by how many rows came
    # with it (first seen at the attention's output projection), not only of the 2,048-wide one: the
    # start-up check's fixed-row blocks cover every layer (docs/benchmarks.md, release 0.9.8).
    text_blocked_min_features = 1

    def _pack_text(self, linears: nn.Module, dtype: torch.dtype) -> None:
        # The attention's projections too, as packed copies that _self_attention calls (pack_attention):
        # one AMX core, a lone description 23.4 -> 19.5 ms; and set_text_fixed_rows can then block them.
        super()._pack_text(linears, dtype)
        pack_attention(linears, dtype)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(bounded_aspect(image.convert("RGB")))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def _move(self, device: torch.device) -> None:
        self.model.to(device)


MAX_ASPECT = 2.0  # longest / shortest side of what open_clip's transform is given


def bounded_aspect(image: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """The image's central region with at most ``max_aspect`` between its sides (the image itself when it
    already has). open_clip's eval transform scales the SHORTEST side to the model's input size and then
    keeps the central square: a 100,000 x 1 image (a few hundred bytes of PNG) became 22,400,000 x 224
    pixels, gigabytes and seconds, before the crop threw all but 224 x 224 of them away. Cutting the
    long side first to ``max_aspect`` times the short one keeps that central square and half its width
    again on each side (far more than the resampling filter reads), so what the model sees is the same
    up to where the crop's edge rounds (at most one pixel)."""
    w, h = image.size
    short = min(w, h)
    long_max = max(1, round(short * max_aspect))
    if max(w, h) <= long_max:
        return image
    long_max += (max(w, h) - long_max) % 2  # an even cut: the region's centre is the image's, exactly
    if w > h:
        left = (w - long_max) // 2
        return image.crop((left, 0, left + long_max, h))
    top = (h - long_max) // 2
    return image.crop((0, top, w, top + long_max))


def _clip_text_forward(m: open_clip.CLIP | ClipTextForward, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text, with the final projection done row by row: as one (B, W) @ (W, E)
    product its rounding would depend on the batch size B, and so would a description's embedding
    (every earlier product has B x length rows, which keeps it in one kernel regime on the CPU), and
    the attention as :func:`_text_transformer` computes it; at the tokens' length (see
    :meth:`OpenClipBackbone._text_lengths`). (B, E) unit-norm float32."""
    cast = m.transformer.get_cast_dtype()
    length = tokens.shape[1]
    x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)
    mask = None if m.attn_mask is None else m.attn_mask[:length, :length]
    x = m.ln_final(_text_transformer(m.transformer, x, mask))
    x = open_clip.model.text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    x = (x.unsqueeze(-1) * m.text_projection).sum(-2)  # (B, W, 1) * (W, E) summed over W
    return F.normalize(x, dim=-1).float()


class ClipTextForward(nn.Module):
    """:func:`_clip_text_forward` as a module holding the text tower's parts alone (the same tensors, not
    copies): the module :meth:`OpenClipBackbone.trace_text` traces, without the image tower."""

    def __init__(self, model: open_clip.CLIP):
        super().__init__()
        self.transformer, self.token_embedding, self.ln_final = model.transformer, model.token_embedding, model.ln_final
        self.positional_embedding, self.text_projection = model.positional_embedding, model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.text_pool_type, self.text_eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _clip_text_forward(self, tokens)


def _self_attention(mha: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """``mha(x, x, x, need_weights=False)[0]`` for batch-first x (B, L, E), computed as one input
    projection over the B*L contiguous rows and ``scaled_dot_product_attention``.

    The values are nn.MultiheadAttention's up to rounding, but here a row's rounding does not depend
    on the batch: nn.MultiheadAttention transposes to (L, B, E) and projects that strided view, and
    on an AVX-512 CPU the product then rounds differently at B = 1, 2-3 and 4+ (measured), so a
    description's embedding would change with its neighbours.
    """
    b, n, e = x.shape
    h = mha.num_heads
    in_proj, out_proj = getattr(mha, "packed_in_proj", None), getattr(mha, "packed_out_proj", None)  # pack_attention
    qkv = in_proj(x) if in_proj is not None else F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, n, e)  # (B, L, E)
    return out_proj(out) if out_proj is not None else F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def _text_transformer(transformer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's text ``Transformer.forward`` with :func:`_self_attention` in every block; any other
    block layout (cross-attention, custom attention, sequence-first) runs open_clip's own forward."""
    blocks = getattr(transformer, "resblocks", None)
    plain = (
        getattr(transformer, "batch_first", False)
        and blocks is not None
        and all(
            type(blk) is ResidualAttentionBlock
            and not hasattr(blk, "ln_1_kv")
            and isinstance(blk.attn, nn.MultiheadAttention)
            and blk.attn.batch_first
            and blk.attn._qkv_same_embed_dim
            and blk.attn.bias_k is None
            and not blk.attn.add_zero_attn
            for blk in blocks
        )
    )
    if not plain:
        return transformer(x, attn_mask=attn_mask)
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None  # as ResidualAttentionBlock.attention does
    for blk in blocks:
        x = x + blk.ls_1(_self_attention(blk.attn, blk.ln_1(x), mask))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x
