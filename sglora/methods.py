"""The methods' names, in a module without torch (the CLI's parser, clients)."""

from __future__ import annotations

# What Engine.generate answers: the generated LoRA's method.
GENERATIVE_METHODS = ("sg-lora", "sg-lora-exact", "topk-weighted", "topk-exact", "adapter-soup", "model-soup", "zero-shot")
SAMPLING_METHODS = ("sg-lora", "sg-lora-exact")  # draw from the generator: need one, take a seed
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
