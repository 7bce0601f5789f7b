"""What this CPU's oneDNN can do, probed independently of the code under test: a test that needs a kernel
skips where the machine lacks it, and fails (rather than skips) where the kernel exists and the code under
test still does not use it."""

from __future__ import annotations

import pytest
import torch


def onednn_reorders_bfloat16() -> bool:
    """Whether oneDNN reorders bfloat16 weights on this CPU: not with AVX2 alone (it needs AVX512-BF16,
    AVX-NE-CONVERT or AMX), where a packed bfloat16 layer cannot be made (the library falls back to plain
    layers, and the service refuses SGLORA_GENERATOR_DTYPE=bfloat16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
needs_onednn_bfloat16 = pytest.mark.skipif(
    not onednn_reorders_bfloat16(), reason="oneDNN reorders no bfloat16 weights on this CPU"
)
