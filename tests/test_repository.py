import json

import pytest
import torch

from expert_store.repository import INDEX_FILE, Expert, ExpertRepository, check_name


def _repo(tiny_backbone, n=3):
    spec = tiny_backbone.spec
    repo = ExpertRepository(spec, tiny_backbone.embed_dim, "fp")
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        snaps = torch.randn(5, spec.num_params, generator=g)
        repo.add(Expert.from_snapshots(f"e{i}", f"expert {i}", snaps, torch.randn(tiny_backbone.embed_dim, generator=g)))
    return repo


def test_mean_and_variance_over_snapshots(tiny_backbone):
    snaps = torch.randn(6, tiny_backbone.spec.num_params)
    e = Expert.from_snapshots("x", "d", snaps, torch.zeros(tiny_backbone.embed_dim))
    torch.testing.assert_close(e.mean, snaps.mean(0))
    torch.testing.assert_close(e.variance, snaps.var(0, unbiased=False))
    assert e.num_snapshots == 6


def test_save_load_add_remove(tiny_backbone, tmp_path):
    repo = _repo(tiny_backbone)
    repo.save(tmp_path)
    loaded = ExpertRepository.load(tmp_path)
    assert loaded.names == ["e0", "e1", "e2"]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["lora"]["rank"] == tiny_backbone.spec.rank and index["embed_dim"] == tiny_backbone.embed_dim
    assert index["code_version"] and all(len(e["sha256"]) == 64 for e in index["experts"])
    torch.testing.assert_close(loaded.stacked()[0], repo.stacked()[0])
    new = Expert.from_snapshots(
        "late", "a late expert", torch.randn(2, tiny_backbone.spec.num_params), torch.randn(tiny_backbone.embed_dim)
    )
    loaded.add_and_save(new, tmp_path)
    loaded.remove_and_save("e1", tmp_path)
    again = ExpertRepository.load(tmp_path)
    assert again.names == ["e0", "e2", "late"]
    assert not (tmp_path / "experts" / "e1.safetensors").exists()
    assert again.stacked()[0].shape == (3, tiny_backbone.spec.num_params)


def test_rejects_bad_experts(tiny_backbone):
    repo = _repo(tiny_backbone, 1)
    p, d = tiny_backbone.spec.num_params, tiny_backbone.embed_dim
    with pytest.raises(ValueError, match="shape"):
        repo.add(Expert("bad", "d", torch.zeros(p + 1), torch.zeros(p + 1), torch.zeros(d), 1))
    nan = torch.zeros(p)
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        repo.add(Expert("bad", "d", nan, torch.zeros(p), torch.zeros(d), 1))
    with pytest.raises(ValueError, match="already exists"):
        repo.add(Expert("e0", "d", torch.zeros(p), torch.zeros(p), torch.zeros(d), 1))
    with pytest.raises(ValueError, match="empty"):
        repo.add(Expert("new", "  ", torch.zeros(p), torch.zeros(p), torch.zeros(d), 1))
    assert repo.names == ["e0"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 65, "a..b"])
def test_names_cannot_escape_the_folder(name):
    with pytest.raises(ValueError, match="invalid expert name"):
        check_name(name)


def test_corrupt_expert_file_is_refused(tiny_backbone, tmp_path):
    _repo(tiny_backbone).save(tmp_path)
    f = tmp_path / "experts" / "e1.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="e1.safetensors"):
        ExpertRepository.load(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ExpertRepository.load(tmp_path)
