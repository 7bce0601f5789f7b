import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_backbone():
    from models.backbone import BackboneConfig, create_backbone

    return create_backbone(BackboneConfig(kind="open_clip", model="tiny-vit", model_config=TINY_MODEL))


@pytest.fixture(scope="session")
def tiny_config():
    from training.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_artifacts_session(tmp_path_factory, tiny_config):
    """One full tiny pipeline run shared by the tests that only read artefacts."""
    from training.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("art") / "tiny"
    run_pipeline(tiny_config, out)
    return out


@pytest.fixture
def tiny_artifacts(tiny_artifacts_session, tmp_path):
    """A private copy, for tests that modify or corrupt artefacts."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts_session, dst)
    return dst
