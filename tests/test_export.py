"""safetensors_bytes writes exactly what the safetensors library writes (header keys sorted)."""

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from sglora.export import safetensors_bytes, to_peft_tensors


def library_bytes(spec, vec, metadata) -> bytes:
    """The reference: safetensors.torch.save, then the header re-emitted with sorted keys."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    raw = save(to_peft_tensors(spec, vec))
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = meta
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_equal_the_librarys_and_load_back(tiny_backbone, seed):
    spec = tiny_backbone.spec
    vec = torch.randn(spec.num_params, generator=torch.Generator().manual_seed(seed))
    meta = {"description": "a cat", "experts": [{"name": "x", "weight": 0.25}], "seed": str(seed), "é": "ü"}
    data = safetensors_bytes(spec, vec, meta)
    assert data == library_bytes(spec, vec, meta)
    assert len(data[: 8 + struct.unpack("<Q", data[:8])[0]]) % 8 == 0
    back = load(data)
    for name, t in to_peft_tensors(spec, vec).items():
        assert torch.equal(back[name], t)
