"""The methods' names, in a module without torch (the CLI's parser, clients)."""

from __future__ import annotations

# What Engine.generate answers: the generated LoRA's method.
GENERATIVE_METHODS = ("sg-lora", "sg-lora-exact", "topk-weighted", "topk-exact", "adapter-soup", "model-soup", "zero-shot")
SAMPLING_METHODS = ("sg-lora", "sg-lora-exact")  # draw from the generator: need one, take a seed
# What a method leaves unused (not in its cache key nor its metadata; `sglora generate` warns of it): the soups
# weigh their experts equally (no softmax, so no temperature), and model-soup mixes every expert (no top_k).
EQUAL_WEIGHT_METHODS = ("adapter-soup", "model-soup")
EVERY_EXPERT_METHODS = ("model-soup",)
# What the evaluation scores, in the order of its tables: the generative methods and the oracle (the unseen
# task's own experts' mean, which only an evaluation has).
EVALUATION_METHODS = (
    "zero-shot",
    "model-soup",
    "adapter-soup",
    "topk-weighted",
    "sg-lora",
    "topk-exact",
    "sg-lora-exact",
    "oracle",
)
