"""An open_clip ViT's image tower as an HF ``transformers`` CLIP vision model, weights included.

The PEFT zip of ``/generate`` names its tensors for HF's CLIP (``vision_model.encoder.layers.{i}.self_attn.
{q,k,v}_proj``). For OpenAI weights, ``CLIPModel.from_pretrained("openai/clip-vit-base-patch16")`` is that
model; for any other open_clip ViT (LAION, DataComp, your own fine-tune, or weights that cannot be
downloaded) this builds it from the open_clip model you have::

    import open_clip
    from peft import PeftModel
    from sglora.hf_clip import hf_vision_model

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained="laion2b_s34b_b88k")
    hf = hf_vision_model(model)                        # transformers.CLIPVisionModelWithProjection
    adapted = PeftModel.from_pretrained(hf, "adapter/")  # the unzipped /generate answer
    embeds = adapted(pixel_values=preprocess(img)[None]).image_embeds   # = model.encode_image, with the LoRA

The mapping (docs/service.md, "PEFT names"): open_clip fuses Wq, Wk, Wv (and their biases) in
``attn.in_proj_weight`` / ``in_proj_bias``, split here into ``q_proj``, ``k_proj``, ``v_proj``; ``ln_pre``
is HF's ``pre_layrnorm``, ``ln_post`` its ``post_layernorm``, ``proj`` (d x e) the transpose of
``visual_projection``; the MLP's activation is carried over (``gelu`` or ``quick_gelu``). Towers HF's
CLIP cannot express (attention pooling, mean pooling, layer scale, extra norms) are refused with a
ValueError naming what differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import CLIPVisionModelWithProjection


def _activation(block: nn.Module) -> str:
    from models.open_clip_backbone import block_activation

    act = block_activation(block)
    if act is None:
        raise ValueError(f"the MLP activation {type(getattr(block.mlp, 'gelu', None)).__name__} has no HF CLIP equivalent")
    return act


def _check_expressible(visual: nn.Module) -> None:
    """ValueError naming the first part of ``visual`` HF's CLIP vision tower does not have."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"not an open_clip VisionTransformer: {type(visual).__name__} (HF's CLIP is a ViT)")
    problems = []
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"pool_type {visual.pool_type!r} (HF pools the class token)")
    if getattr(visual, "final_ln_after_pool", False):
        problems.append("final_ln_after_pool")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        problems.append("no ln_pre")
    if visual.proj is None:
        problems.append("no projection")
    if visual.conv1.bias is not None:
        problems.append("a patch-embedding bias")
    for i, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block.attn, nn.MultiheadAttention) or block.attn.in_proj_weight is None:
            problems.append(f"block {i}: attention without a fused in_proj_weight")
        for extra in ("ls_1", "ls_2", "ln_attn"):
            if not isinstance(getattr(block, extra, nn.Identity()), nn.Identity):
                problems.append(f"block {i}: {extra}")
        if not isinstance(getattr(block.mlp, "ln", nn.Identity()), nn.Identity):
            problems.append(f"block {i}: a norm inside the MLP")
    if problems:
        raise ValueError("this open_clip vision tower has no HF CLIP equivalent: " + "; ".join(problems))


def _square(value, what: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"HF's CLIP takes a square {what}, this tower's is {a} x {b}")
    return int(a)


def hf_vision_config(model: nn.Module) -> dict:
    """The ``transformers.CLIPVisionConfig`` keyword arguments of an open_clip ViT (``model`` or its ``.visual``)."""
    visual = getattr(model, "visual", model)
    _check_expressible(visual)
    blocks = list(visual.transformer.resblocks)
    first = blocks[0]
    acts = {_activation(b) for b in blocks}
    if len(acts) > 1:
        raise ValueError(f"the blocks use different activations: {sorted(acts)}")
    return {
        "hidden_size": visual.conv1.out_channels,
        "intermediate_size": first.mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads,
        "image_size": _square(visual.image_size, "image size"),
        "patch_size": _square(visual.patch_size, "patch size"),
        "num_channels": visual.conv1.in_channels,
        "hidden_act": acts.pop(),
        "layer_norm_eps": first.ln_1.eps,
        "projection_dim": visual.proj.shape[1],
    }


def hf_vision_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of an open_clip ViT under ``CLIPVisionModelWithProjection``'s names (copies)."""
    visual = getattr(model, "visual", model)
    _check_expressible(visual)
    d = visual.conv1.out_channels
    p = "vision_model."
    sd = {
        p + "embeddings.class_embedding": visual.class_embedding,
        p + "embeddings.patch_embedding.weight": visual.conv1.weight,
        p + "embeddings.position_embedding.weight": visual.positional_embedding,
        p + "pre_layrnorm.weight": visual.ln_pre.weight,
        p + "pre_layrnorm.bias": visual.ln_pre.bias,
        p + "post_layernorm.weight": visual.ln_post.weight,
        p + "post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.t(),
    }
    for i, block in enumerate(visual.transformer.resblocks):
        q = f"{p}encoder.layers.{i}."
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        for j, name in enumerate("qkv"):
            sd[q + f"self_attn.{name}_proj.weight"] = w[j * d : (j + 1) * d]
            sd[q + f"self_attn.{name}_proj.bias"] = b[j * d : (j + 1) * d]
        for hf_name, layer in (
            ("self_attn.out_proj", block.attn.out_proj),
            ("layer_norm1", block.ln_1),
            ("layer_norm2", block.ln_2),
            ("mlp.fc1", block.mlp.c_fc),
            ("mlp.fc2", block.mlp.c_proj),
        ):
            sd[q + hf_name + ".weight"] = layer.weight
            sd[q + hf_name + ".bias"] = layer.bias
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def hf_vision_model(model: nn.Module) -> CLIPVisionModelWithProjection:
    """An HF ``CLIPVisionModelWithProjection`` with the weights of an open_clip ViT (``model`` or its
    ``.visual``), in eval mode: its ``image_embeds`` are ``model.encode_image``'s. Needs ``transformers``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**hf_vision_config(model)))
    missing, unexpected = hf.load_state_dict(hf_vision_state_dict(model), strict=False)
    persistent = {k for k in hf.state_dict() if k in missing}
    if unexpected or persistent:
        raise ValueError(
            f"the converted weights do not fit transformers' CLIP: missing {sorted(persistent)}, unexpected {unexpected}"
        )
    visual = getattr(model, "visual", model)
    param = next(visual.parameters())
    return hf.to(dtype=param.dtype, device=param.device).eval()
