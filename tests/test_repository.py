import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from expert_store import repository
from expert_store.repository import INDEX_FILE, Expert, ExpertRepository, RepositoryChanged, check_name


def _repo(tiny_backbone, n=3):
    spec = tiny_backbone.spec
    repo = ExpertRepository(spec, tiny_backbone.embed_dim, "fp")
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        snaps = torch.randn(5, spec.num_params, generator=g)
        repo.add(Expert.from_snapshots(f"e{i}", f"expert {i}", snaps, torch.randn(tiny_backbone.embed_dim, generator=g)))
    return repo


def test_mean_and_variance_over_snapshots(tiny_backbone):
    # Per coordinate: snapshots 1, 3 (mean 2, variance 1) and 2, 6 (mean 4, variance 4), population variance;
    # one snapshot alone has variance 0.
    p = tiny_backbone.spec.num_params
    snaps = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).repeat(1, p // 2 + 1)[:, :p]
    e = Expert.from_snapshots("x", "d", snaps, torch.zeros(tiny_backbone.embed_dim))
    assert torch.equal(e.mean, torch.tensor([2.0, 4.0]).repeat(p // 2 + 1)[:p])
    assert torch.equal(e.variance, torch.tensor([1.0, 4.0]).repeat(p // 2 + 1)[:p])
    assert e.num_snapshots == 2
    single = Expert.from_snapshots("y", "d", snaps[:1], torch.zeros(tiny_backbone.embed_dim))
    assert torch.equal(single.mean, snaps[0]) and torch.equal(single.variance, torch.zeros(p))


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
    assert loaded.index_bytes() == (tmp_path / INDEX_FILE).read_bytes()  # what a change's version hashes
    loaded.remove_and_save("e1", tmp_path)
    assert loaded.index_bytes() == (tmp_path / INDEX_FILE).read_bytes()
    again = ExpertRepository.load(tmp_path)
    assert again.names == ["e0", "e2", "late"]
    assert not (tmp_path / "experts" / "e1.safetensors").exists()
    assert again.stacked()[0].shape == (3, tiny_backbone.spec.num_params)


def test_saving_after_a_removal_in_memory_leaves_no_orphan_file(tiny_backbone, tmp_path, caplog):
    _repo(tiny_backbone).save(tmp_path)
    loaded = ExpertRepository.load(tmp_path)
    loaded.remove("e1")
    loaded.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "experts").glob("*.safetensors")) == ["e0.safetensors", "e2.safetensors"]
    caplog.clear()
    assert ExpertRepository.load(tmp_path).names == ["e0", "e2"]
    assert "does not list" not in caplog.text  # no orphan named at every later load


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
    # Wrong types are named, not an AttributeError from deep inside (a numpy mean, a list, an int description)
    with pytest.raises(TypeError, match="mean must be a floating-point torch.Tensor, got ndarray"):
        repo.add(Expert("new", "d", torch.zeros(p).numpy(), torch.zeros(p), torch.zeros(d), 1))
    with pytest.raises(TypeError, match="embedding must be a floating-point torch.Tensor, got list"):
        repo.add(Expert("new", "d", torch.zeros(p), torch.zeros(p), [0.0] * d, 1))
    with pytest.raises(TypeError, match="variance must be a floating-point torch.Tensor, got a torch.int64 tensor"):
        repo.add(Expert("new", "d", torch.zeros(p), torch.zeros(p, dtype=torch.long), torch.zeros(d), 1))
    with pytest.raises(TypeError, match="description must be a str, got int"):
        repo.add(Expert("new", 7, torch.zeros(p), torch.zeros(p), torch.zeros(d), 1))
    for n in (0, -1, 2.5, "five", True):
        with pytest.raises(ValueError, match="num_snapshots must be an integer >= 1"):
            repo.add(Expert("new", "d", torch.zeros(p), torch.zeros(p), torch.zeros(d), n))
    assert repo.names == ["e0"]
    repo.add(Expert("new", "d", torch.zeros(p), torch.zeros(p), torch.zeros(d), np.int64(3)))  # a numpy integer: kept as int
    assert type(repo["new"].num_snapshots) is int and repo["new"].num_snapshots == 3


# "disc\n": once let through by the pattern's "$"
@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 65, "a..b", "disc\n"])
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


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda index: [], "not a version-"),
        (lambda index: {k: v for k, v in index.items() if k != "embed_dim"}, r"malformed index \(KeyError: field 'embed_dim'\)"),
        (lambda index: {**index, "experts": [7]}, r"malformed index \(TypeError"),
        (lambda index: {**index, "lora": "x"}, r"malformed index \(TypeError"),
        (
            lambda index: {**index, "experts": [{**index["experts"][0], "num_snapshots": "lots"}]},
            "expert 'e0': num_snapshots must be an integer >= 1, got 'lots'",
        ),
    ],
)
def test_a_malformed_index_is_named(tiny_backbone, tmp_path, edit, needle):
    """The index is not pinned by the manifest (the service changes it): an edit by hand gave tracebacks
    (AttributeError, TypeError) or a bare "'embed_dim'"."""
    _repo(tiny_backbone).save(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    (tmp_path / INDEX_FILE).write_text(json.dumps(edit(index)))
    with pytest.raises(ValueError, match=f"{INDEX_FILE}: {needle}"):
        ExpertRepository.load(tmp_path)


def _late(tiny_backbone, name="late", seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    p, d = tiny_backbone.spec.num_params, tiny_backbone.embed_dim
    return Expert.from_snapshots(name, f"a {name} expert", torch.randn(2, p, generator=g), torch.randn(d, generator=g))


def test_two_writers_on_one_directory_cannot_undo_each_other(tiny_backbone, tmp_path):
    # Two processes serving one directory: B's removal rewrote the index from B's memory, dropping what A
    # had added, and A's next change then failed on B's deleted file. Now the second writer is refused.
    _repo(tiny_backbone).save(tmp_path)
    a, b = ExpertRepository.load(tmp_path), ExpertRepository.load(tmp_path)
    a.add_and_save(_late(tiny_backbone, "z1"), tmp_path)
    with pytest.raises(RepositoryChanged, match="changed since this repository was loaded"):
        b.remove_and_save("e2", tmp_path)
    with pytest.raises(RepositoryChanged):
        b.add_and_save(_late(tiny_backbone, "z2"), tmp_path)
    assert b.names == ["e0", "e1", "e2"]  # the refused changes left B's memory as it was
    assert not (tmp_path / "experts" / "z2.safetensors").exists()
    a.remove_and_save("e2", tmp_path)  # A wrote the index last: its changes go on
    assert ExpertRepository.load(tmp_path).names == ["e0", "e1", "z1"]


def test_loading_removes_a_killed_writers_temporary_files_and_names_orphans(tiny_backbone, tmp_path, caplog):
    _repo(tiny_backbone).save(tmp_path)
    left = [tmp_path / ".repository.json.abc123.tmp", tmp_path / "experts" / ".x.safetensors.def456.tmp"]
    for f in left:
        f.write_bytes(b"half")
    repo = _repo(tiny_backbone, 1)
    repo._write_expert(tmp_path, _late(tiny_backbone, "x1"))  # an expert file written, the index never
    with caplog.at_level("WARNING", logger="sglora.repository"):
        assert ExpertRepository.load(tmp_path).names == ["e0", "e1", "e2"]
    assert not any(f.exists() for f in left)
    assert "did not finish" in caplog.text and "the index does not list (ignored): x1.safetensors" in caplog.text


def test_the_digest_kept_on_load_is_that_of_the_index_it_parsed(tiny_backbone, tmp_path, monkeypatch):
    # Another process's write landing between reading the index and hashing it gave the new file's digest
    # to the old experts: the next change then passed the check and dropped the other's expert.
    import expert_store.repository as r

    _repo(tiny_backbone).save(tmp_path)
    real = r.read_json_and_digest

    def read_then_other_writes(path, what):
        out = real(path, what)
        monkeypatch.setattr(r, "read_json_and_digest", real)
        ExpertRepository.load(tmp_path).add_and_save(_late(tiny_backbone, "from_b"), tmp_path)
        return out

    monkeypatch.setattr(r, "read_json_and_digest", read_then_other_writes)
    a = ExpertRepository.load(tmp_path)
    assert "from_b" not in a.names
    with pytest.raises(RepositoryChanged):
        a.remove_and_save("e0", tmp_path)
    assert "from_b" in ExpertRepository.load(tmp_path).names


def test_nothing_after_the_index_rename_can_fail_the_change(tiny_backbone, tmp_path, monkeypatch):
    # Hashing the index again after renaming it sat inside the rollback: a failed read there deleted the
    # expert file the index on disk already listed, and the next load failed.
    import expert_store.repository as r

    _repo(tiny_backbone).save(tmp_path)
    repo = ExpertRepository.load(tmp_path)
    real_hash, real_write = r.sha256_file, r.write_bytes
    written = []

    def write(path, data):
        real_write(path, data)
        written.append(path.name)

    def failing_read_back(path):
        if path.name == INDEX_FILE and INDEX_FILE in written:
            raise OSError(5, "Input/output error")
        return real_hash(path)

    monkeypatch.setattr(r, "write_bytes", write)
    monkeypatch.setattr(r, "sha256_file", failing_read_back)
    repo.add_and_save(_late(tiny_backbone), tmp_path)
    written.clear()
    repo.remove_and_save("e1", tmp_path)
    assert ExpertRepository.load(tmp_path).names == ["e0", "e2", "late"]


def test_loading_does_not_wait_for_a_writer_and_leaves_its_files(tiny_backbone, tmp_path):
    from expert_store.repository import locked

    _repo(tiny_backbone).save(tmp_path)
    busy = tmp_path / ".repository.json.inflight.tmp"
    with locked(tmp_path) as held:  # another writer, mid-change
        assert held
        busy.write_bytes(b"being written")
        assert ExpertRepository.load(tmp_path).names == ["e0", "e1", "e2"]  # no wait, no tidy
        assert busy.exists()
    ExpertRepository.load(tmp_path)
    assert not busy.exists()


def test_an_index_rewrite_records_the_digests_known_not_a_file_corrupted_since(tiny_backbone, tmp_path):
    """Each change rewrote the index with every expert file's sha256 read from disk again: a file corrupted
    on disk since the load was approved by the next change, and served after a restart."""
    _repo(tiny_backbone).save(tmp_path)
    repo = ExpertRepository.load(tmp_path)
    path = tmp_path / "experts" / "e0.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 mismatch.*e0\.safetensors"):
        ExpertRepository.load(tmp_path)
    late = Expert("late", "added after", repo["e1"].mean, repo["e1"].variance, repo["e1"].embedding, 1)
    repo.add_and_save(late, tmp_path)
    repo.remove_and_save("e2", tmp_path)
    with pytest.raises(ValueError, match=r"sha256 mismatch.*e0\.safetensors"):  # still refused
        ExpertRepository.load(tmp_path)
    path.unlink()
    repo.save(tmp_path)  # a full save writes every file again, from memory: sound again
    assert ExpertRepository.load(tmp_path).names == ["e0", "e1", "late"]


def test_a_load_during_another_process_change_reads_the_new_index(tiny_backbone, tmp_path, monkeypatch):
    """Another process's change (index first, then the file) between a load's read of the index and of an expert
    file: the file is gone or another one. The load reads the new index again instead of failing (a replica
    starting, sglora evaluate); where the index did not change, a missing or corrupt file still fails."""
    import expert_store.repository as r

    _repo(tiny_backbone).save(tmp_path)
    other = ExpertRepository.load(tmp_path)
    real = ExpertRepository._from_index.__func__
    calls = []

    def changed_midway(cls, directory, *args):
        calls.append(1)
        if len(calls) == 1:
            other.remove_and_save("e1", tmp_path)  # after this load read the index naming e1
            replaced = other["e2"]
            other.remove_and_save("e2", tmp_path)
            other.add_and_save(r.Expert("e2", "replaced", replaced.mean * 2, replaced.variance, replaced.embedding, 1), tmp_path)
        return real(cls, directory, *args)

    monkeypatch.setattr(ExpertRepository, "_from_index", classmethod(changed_midway))
    loaded = ExpertRepository.load(tmp_path)
    assert len(calls) == 2 and loaded.names == ["e0", "e2"] and loaded["e2"].description == "replaced"
    monkeypatch.undo()
    (tmp_path / "experts" / "e0.safetensors").unlink()  # the index unchanged: a real loss, named
    with pytest.raises(FileNotFoundError, match="expert file missing"):
        ExpertRepository.load(tmp_path)


def test_an_index_never_names_an_expert_that_was_not_written(tiny_backbone, tmp_path):
    """An expert removed and added again in memory had its old file's digest still on record: the next
    add_and_save wrote an index naming a deleted file, and the repository loaded no more."""
    _repo(tiny_backbone).save(tmp_path)
    repo = ExpertRepository.load(tmp_path)
    again = repo["e0"]
    repo.remove_and_save("e0", tmp_path)
    index = (tmp_path / "repository.json").read_bytes()
    repo.add(Expert("e0", "back, in memory only", again.mean, again.variance, again.embedding, 1))
    late = Expert("late", "added after", again.mean, again.variance, again.embedding, 1)
    for change in (lambda: repo.add_and_save(late, tmp_path), lambda: repo.remove_and_save("e1", tmp_path)):
        with pytest.raises(ValueError, match=r"\['e0'\] were added in memory and never written"):
            change()
        assert (tmp_path / "repository.json").read_bytes() == index and not (tmp_path / "experts" / "late.safetensors").exists()
    assert ExpertRepository.load(tmp_path).names == ["e1", "e2"]
    repo.save(tmp_path)  # writes them all
    assert ExpertRepository.load(tmp_path).names == ["e1", "e2", "e0"]
    # Made in memory with experts, into a fresh directory: refused before anything is written.
    fresh = _repo(tiny_backbone)
    with pytest.raises(ValueError, match="never written"):
        fresh.add_and_save(late, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "repository.json").exists()


def test_a_load_across_the_pipelines_folder_swap_reads_the_new_folder(tiny_backbone, tmp_path, monkeypatch):
    """sglora pipeline replaces the repository folder (the old one moved aside, then the new one moved in): a
    load that read the old index and then found no index at all read it as a missing file, not a change."""
    import expert_store.repository as r

    d = tmp_path / "repository"
    _repo(tiny_backbone).save(d)
    rebuilt = _repo(tiny_backbone)
    rebuilt.remove("e2")
    rebuilt.save(tmp_path / "rebuilt")
    real, real_sleep = ExpertRepository._from_index.__func__, r.time.sleep
    steps = []

    def swapped_midway(cls, directory, *args):
        if not steps:
            steps.append("old folder moved aside")
            d.rename(tmp_path / "old")
        return real(cls, directory, *args)

    def sleep(seconds):  # the retry's pause: the new folder moves in meanwhile
        if steps == ["old folder moved aside"]:
            steps.append("new folder moved in")
            (tmp_path / "rebuilt").rename(d)
        real_sleep(seconds)

    monkeypatch.setattr(ExpertRepository, "_from_index", classmethod(swapped_midway))
    monkeypatch.setattr(r.time, "sleep", sleep)
    assert ExpertRepository.load(d).names == ["e0", "e1"] and len(steps) == 2


def test_orphans_are_named_only_while_no_other_process_holds_the_lock(tiny_backbone, tmp_path, caplog):
    from expert_store.repository import locked

    _repo(tiny_backbone).save(tmp_path)
    (tmp_path / "experts" / "adding.safetensors").write_bytes(b"another process's new expert")
    with locked(tmp_path) as held:  # that process, between its expert file and its index
        assert held
        ExpertRepository.load(tmp_path)
    assert "does not list" not in caplog.text
    ExpertRepository.load(tmp_path)  # no one changing it: a real orphan
    assert "the index does not list (ignored): adding.safetensors" in caplog.text


def test_a_change_waits_for_the_lock_at_most_its_timeout(tiny_backbone, tmp_path):
    import time

    from expert_store.repository import RepositoryBusy, locked

    _repo(tiny_backbone).save(tmp_path)
    repo = ExpertRepository.load(tmp_path)
    index = (tmp_path / "repository.json").read_bytes()
    late = Expert("late", "added after", repo["e1"].mean, repo["e1"].variance, repo["e1"].embedding, 1)
    with locked(tmp_path) as held:  # another process, mid-change
        assert held
        t0 = time.monotonic()
        with pytest.raises(RepositoryBusy, match="nothing was changed"):
            repo.add_and_save(late, tmp_path, lock_timeout_s=0.2)
        with pytest.raises(RepositoryBusy):
            repo.remove_and_save("e1", tmp_path, lock_timeout_s=0.2)
        assert 0.4 <= time.monotonic() - t0 < 10
    assert repo.names == ["e0", "e1", "e2"] and (tmp_path / "repository.json").read_bytes() == index
    assert not (tmp_path / "experts" / "late.safetensors").exists()
    repo.add_and_save(late, tmp_path, lock_timeout_s=0.2)  # free: made
    assert ExpertRepository.load(tmp_path).names == ["e0", "e1", "e2", "late"]


def test_the_lock_file_is_opened_for_writing_where_allowed(tmp_path, monkeypatch):
    # NFS turns an exclusive flock into a byte-range lock, which needs a descriptor open for writing.
    import os

    import expert_store.repository as r

    modes = []
    real_open = os.open

    def recording_open(path, flags, *args):
        modes.append(flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR))
        return real_open(path, flags, *args)

    monkeypatch.setattr(r.os, "open", recording_open)
    with r.locked(tmp_path) as held:
        assert held
    assert modes == [os.O_RDWR]

    def read_only_for_writers(path, flags, *args):  # e.g. a .lock another user created, mode 0644
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return recording_open(path, flags, *args)

    monkeypatch.setattr(r.os, "open", read_only_for_writers)
    with r.locked(tmp_path) as held:
        assert held
    assert modes[-1] == os.O_RDONLY


def test_a_repository_made_in_memory_does_not_replace_one_on_disk(tiny_backbone, tmp_path):
    # A new ExpertRepository's add_and_save (or save) into a directory that held a repository rewrote the
    # index with its own experts alone: the others dropped out of it, their files left as orphans.
    _repo(tiny_backbone).save(tmp_path)
    before = (tmp_path / INDEX_FILE).read_bytes()
    fresh = ExpertRepository(tiny_backbone.spec, tiny_backbone.embed_dim, "fp")
    with pytest.raises(RepositoryChanged, match="holds an expert repository this object did not load"):
        fresh.add_and_save(_late(tiny_backbone), tmp_path)
    with pytest.raises(RepositoryChanged, match="did not load"):
        _repo(tiny_backbone, 1).save(tmp_path)
    assert (tmp_path / INDEX_FILE).read_bytes() == before and fresh.names == []
    assert not (tmp_path / "experts" / "late.safetensors").exists()
    # saved over by the object that loaded it: allowed, unless another writer changed it since
    loaded, other = ExpertRepository.load(tmp_path), ExpertRepository.load(tmp_path)
    loaded.remove("e0")
    loaded.save(tmp_path)
    with pytest.raises(RepositoryChanged, match="changed since"):
        other.save(tmp_path)
    assert ExpertRepository.load(tmp_path).names == ["e1", "e2"]


def test_a_new_repository_is_built_in_a_new_directory_given_as_a_string(tiny_backbone, tmp_path):
    # add_and_save into a missing directory failed on its lock file; str paths failed on '/'.
    target = str(tmp_path / "new" / "repository")
    fresh = ExpertRepository(tiny_backbone.spec, tiny_backbone.embed_dim, "fp")
    fresh.add_and_save(_late(tiny_backbone, "a"), target)
    fresh.add_and_save(_late(tiny_backbone, "b"), target)
    fresh.remove_and_save("a", target)
    assert ExpertRepository.load(target).names == ["b"]
    _repo(tiny_backbone).save(str(tmp_path / "other"))
    assert len(ExpertRepository.load(str(tmp_path / "other"))) == 3


def test_experts_are_kept_as_float32(tiny_backbone):
    # A float64 expert made every stacked mean, merge and sample float64 (Generation.lora is float32).
    p, d = tiny_backbone.spec.num_params, tiny_backbone.embed_dim
    repo = _repo(tiny_backbone, 1)
    snaps = torch.randn(3, p, dtype=torch.float64)
    repo.add(Expert.from_snapshots("wide", "a float64 expert", snaps, torch.randn(d, dtype=torch.float64)))
    assert all(t.dtype == torch.float32 for t in repo.stacked())
    assert repo["wide"].mean.dtype == torch.float32
    torch.testing.assert_close(repo["wide"].mean, snaps.mean(0).float())


def test_an_expert_added_and_saved_is_written_as_the_float32_copy_it_keeps(tiny_backbone, tmp_path):
    """add_and_save wrote the caller's float64 tensors (twice the bytes, another sha256 than a later save's)."""
    p, d = tiny_backbone.spec.num_params, tiny_backbone.embed_dim
    _repo(tiny_backbone, 1).save(tmp_path)
    repo = ExpertRepository.load(tmp_path)
    wide = Expert(
        "wide",
        "a float64 expert",
        torch.randn(p, dtype=torch.float64),
        torch.rand(p, dtype=torch.float64),
        torch.randn(d, dtype=torch.float64),
        3,
    )
    repo.add_and_save(wide, tmp_path)
    written = load_file(str(tmp_path / "experts" / "wide.safetensors"))
    assert all(t.dtype == torch.float32 for t in written.values())
    torch.testing.assert_close(written["mean"], wide.mean.float(), rtol=0, atol=0)
    before = (tmp_path / INDEX_FILE).read_bytes()
    repo.save(tmp_path)  # the same files again: same bytes, same index
    assert (tmp_path / INDEX_FILE).read_bytes() == before
    assert ExpertRepository.load(tmp_path).names == ["e0", "wide"]


def test_a_change_into_a_folder_without_the_repository_is_refused_by_name(tiny_backbone, tmp_path):
    """A loaded repository changed into another folder: a missing one failed on its lock file's path
    (FileNotFoundError), a file as NotADirectoryError."""
    _repo(tiny_backbone, 2).save(tmp_path / "repo")
    repo = ExpertRepository.load(tmp_path / "repo")
    (tmp_path / "a-file").write_text("x")
    for target in (tmp_path / "new", tmp_path / "a-file"):
        with pytest.raises(RepositoryChanged, match=f"{target} holds no expert repository"):
            repo.add_and_save(_late(tiny_backbone), target)
        with pytest.raises(RepositoryChanged, match=f"{target} holds no expert repository"):
            repo.remove_and_save("e0", target)
    assert not (tmp_path / "new").exists() and repo.names == ["e0", "e1"]
    assert ExpertRepository.load(tmp_path / "repo").names == ["e0", "e1"]


def test_state_index_bytes_name_every_state_and_are_the_index_once_written(tiny_backbone, tmp_path):
    repo = _repo(tiny_backbone, 2)
    unwritten = repo.state_index_bytes()  # experts added in memory: named by the digests of their files-to-be
    repo.save(tmp_path)
    assert unwritten == repo.state_index_bytes() == repo.index_bytes() == (tmp_path / INDEX_FILE).read_bytes()
    changes = repo.changes
    removed = repo.remove("e1")
    assert repo.changes == changes + 1 and repo.state_index_bytes() != unwritten
    repo.add(removed)
    assert repo.changes == changes + 2 and repo.state_index_bytes() == unwritten  # the same experts, in the same order


def test_stacked_experts_hold_their_values_once_and_write_the_same_files(tiny_backbone, tmp_path):
    repo = _repo(tiny_backbone)
    before = {n: (repo[n].mean.clone(), repo[n].variance.clone(), repo[n].embedding.clone()) for n in repo.names}
    repo.save(tmp_path / "a")
    means, variances, embeddings = repo.stacked()
    for i, name in enumerate(repo.names):  # each expert's tensors are now rows of the stack, values unchanged
        e = repo[name]
        for t, stack in ((e.mean, means), (e.variance, variances), (e.embedding, embeddings)):
            assert t.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
        assert e.mean.data_ptr() == means[i].data_ptr()
        assert all(torch.equal(t, b) for t, b in zip((e.mean, e.variance, e.embedding), before[name], strict=True))
    assert repo.stacked()[0] is means  # kept until a change
    repo.save(tmp_path / "b")  # rows of the stack write the bytes the experts' own tensors wrote
    for name in repo.names:
        assert (tmp_path / "a" / "experts" / f"{name}.safetensors").read_bytes() == (
            tmp_path / "b" / "experts" / f"{name}.safetensors"
        ).read_bytes()
    removed = repo.remove(repo.names[0])  # its own copies: a row would keep the whole stack alive
    assert removed.mean.untyped_storage().data_ptr() != means.untyped_storage().data_ptr()
    assert removed.mean.untyped_storage().nbytes() == removed.mean.numel() * 4
    # A load copies each expert into the stack as it reads it: the experts are its rows from the start.
    loaded = ExpertRepository.load(tmp_path / "b")
    assert loaded._stack is not None  # stacked by the load itself, not at the first use
    stack = loaded._stack.tensors
    assert loaded.stacked() is stack
    for i, name in enumerate(loaded.names):
        e = loaded[name]
        assert [t.data_ptr() for t in (e.mean, e.variance, e.embedding)] == [part[i].data_ptr() for part in stack]
        assert all(torch.equal(t, b) for t, b in zip((e.mean, e.variance, e.embedding), before[name], strict=True))


def test_row_keys_follow_the_experts_and_are_new_for_an_expert_added_again(tiny_backbone, tmp_path, monkeypatch):
    repo = _repo(tiny_backbone)
    keys = dict(zip(repo.names, repo.row_keys(), strict=True))
    assert len(set(keys.values())) == 3
    repo.stacked()  # restacking changes no key
    assert repo.row_keys() == list(keys.values())
    e1 = repo.remove("e1")
    assert repo.row_keys() == [keys["e0"], keys["e2"]]
    repo.add(e1)
    assert repo.names == ["e0", "e2", "e1"] and repo.row_keys()[:2] == [keys["e0"], keys["e2"]]
    assert repo.row_keys()[2] not in keys.values()
    repo.save(tmp_path)
    loaded = ExpertRepository.load(tmp_path)
    kept = loaded.row_keys()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("expert_store.repository.write_bytes", fail)
    with pytest.raises(OSError, match="disk full"):
        loaded.remove_and_save("e0", tmp_path)  # rolled back: the same experts, the same keys
    assert loaded.names == ["e0", "e2", "e1"] and loaded.row_keys() == kept


def test_derived_values_are_worked_out_once_per_state_and_go_with_it(tiny_backbone):
    repo = _repo(tiny_backbone)
    calls = []

    def norms(means, variances, embeddings):
        calls.append(means)
        return embeddings.norm(dim=-1)

    first = repo.derived("norms", norms)
    assert repo.derived("norms", norms) is first and len(calls) == 1 and calls[0] is repo.stacked()[0]
    repo.add(
        Expert.from_snapshots(
            "late", "a late expert", torch.randn(2, tiny_backbone.spec.num_params), torch.randn(tiny_backbone.embed_dim)
        )
    )
    again = repo.derived("norms", norms)  # a change: worked out again, from the new stack
    assert len(calls) == 2 and calls[1] is repo.stacked()[0] and again.shape == (4,)
    repo.remove("late")
    assert repo.derived("norms", norms).shape == (3,) and len(calls) == 3


def test_a_lock_file_unlinked_by_its_holder_is_not_held_by_the_next_one(tmp_path):
    """A holder that removes its lock file (a failed pipeline run cleaning up the folder it made) let a waiter
    lock the removed file while a third locked the new one at the path: two held the lock. The waiter now
    locks the file at the path."""
    import fcntl
    import os
    import threading
    import time

    from expert_store.repository import locked

    path = tmp_path / ".lock"
    first = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(first, fcntl.LOCK_EX)
    got = threading.Event()
    release = threading.Event()

    def waiter():
        with locked(tmp_path) as held:
            assert held
            got.set()
            release.wait(10)

    t = threading.Thread(target=waiter)
    t.start()
    # The waiter has opened the first file and waits on it: Linux lists a blocked flock as "-> FLOCK" on the
    # file's inode; elsewhere a pause stands in for it.
    locks, inode = Path("/proc/locks"), f":{os.stat(path).st_ino} "
    if locks.exists():
        end = time.monotonic() + 10
        while not any("-> FLOCK" in line and inode in line for line in locks.read_text().splitlines()):
            assert time.monotonic() < end, "the waiter never blocked on the held lock"
            time.sleep(0.005)
    else:
        time.sleep(0.2)
    path.unlink()
    path.touch()  # another run's lock file, at the path now
    os.close(first)  # the first holder goes: the waiter gets the removed file, then the one at the path
    assert got.wait(10)
    probe = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # the file at the path is the one held
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)
        release.set()
        t.join(10)


def test_a_lock_on_a_mount_whose_stat_and_fstat_disagree_is_still_taken(tmp_path, monkeypatch):
    """Some FUSE and overlay mounts report another inode through fstat than through stat: the check that
    the locked file is the one at the path spun there for good. It gives up after a few tries."""
    import os

    real = os.fstat

    def shifted(fd):
        st = real(fd)
        return os.stat_result((st.st_mode, st.st_ino + 1, *tuple(st)[2:]))

    monkeypatch.setattr(repository.os, "fstat", shifted)
    for wait in (False, True):
        with repository.locked(tmp_path, wait=wait) as held:
            assert held


def test_a_load_reusing_an_earlier_state_reads_only_the_changed_experts(tiny_backbone, tmp_path, caplog):
    """``reuse``: the experts whose files the index still names by the same sha256 come from memory, with
    their row keys (a file of theirs spoilt on disk since is not read, so not refused); an expert added or
    replaced under its name is read from disk and gets a new key; a repository of another layout is not used."""
    _repo(tiny_backbone).save(tmp_path)
    served = ExpertRepository.load(tmp_path)
    keys = dict(zip(served.names, served.row_keys(), strict=True))
    other = ExpertRepository.load(tmp_path)  # another process changes the directory
    g = torch.Generator().manual_seed(7)
    p, d = tiny_backbone.spec.num_params, tiny_backbone.embed_dim
    other.add_and_save(
        Expert.from_snapshots("late", "a late one", torch.randn(3, p, generator=g), torch.randn(d, generator=g)), tmp_path
    )
    other.remove_and_save("e2", tmp_path)
    replaced = Expert.from_snapshots("e2", "expert 2, again", torch.randn(3, p, generator=g), torch.randn(d, generator=g))
    other.add_and_save(replaced, tmp_path)
    spoilt = tmp_path / "experts" / "e0.safetensors"
    spoilt.write_bytes(b"\0" * spoilt.stat().st_size)
    with pytest.raises(ValueError, match="corrupt"):
        ExpertRepository.load(tmp_path)  # read whole: e0's file is refused
    with caplog.at_level("INFO", logger="sglora.repository"):
        again = ExpertRepository.load(tmp_path, reuse=served)
    assert any("2 of 4 experts taken from memory" in m for m in caplog.messages)
    assert again.names == ["e0", "e1", "late", "e2"] and again.index_sha256 == other.index_sha256
    for name in again.names:
        want = served[name] if name in ("e0", "e1") else other[name]
        assert all(torch.equal(getattr(again[name], k), getattr(want, k)) for k in ("mean", "variance", "embedding"))
    assert again["e2"].description == "expert 2, again" and torch.equal(again["e2"].mean, replaced.mean)
    new_keys = dict(zip(again.names, again.row_keys(), strict=True))
    assert new_keys["e0"] == keys["e0"] and new_keys["e1"] == keys["e1"]
    assert new_keys["e2"] != keys["e2"] and new_keys["late"] not in keys.values()
    assert again.stacked()[0].shape == (4, p)

    elsewhere = ExpertRepository(served.spec, served.embed_dim, "another backbone", [served["e1"]])
    elsewhere._file_sha256 = dict(served._file_sha256)
    with pytest.raises(ValueError, match="corrupt"):
        ExpertRepository.load(tmp_path, reuse=elsewhere)  # not this backbone's: every file read


def test_a_load_reusing_an_earlier_state_still_checks_the_values_of_the_files_it_reads(tiny_backbone, tmp_path):
    """Only the experts taken from memory skip the passes over their values: a file read, whose sha256 the
    index names, with a NaN in its mean is refused as a whole load refuses it."""
    _repo(tiny_backbone).save(tmp_path)
    served = ExpertRepository.load(tmp_path)
    path = tmp_path / "experts" / "e2.safetensors"
    t = load_file(path)
    t["mean"][3] = float("nan")
    save_file(t, path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["experts"][2]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    for reuse in (None, served):
        with pytest.raises(ValueError, match="e2.*NaN"):
            ExpertRepository.load(tmp_path, reuse=reuse)


def _same_stack(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.stacked(), b.stacked(), strict=True))


def test_an_addition_fills_a_spare_row_and_leaves_the_former_state_as_it_was(tiny_backbone, tmp_path):
    """An expert added while the stack has room is written into its next row: the new stack is the former
    one's rows and that row (no copy of every expert), the former state's tensors hold the same values, what
    :meth:`derived` keeps with an ``extend`` is extended and gives what it would work out anew, the rest is
    dropped. Once the rows run out, or after a removal, the next use stacks anew; every state holds the
    values a load of its files gives."""
    repo = _repo(tiny_backbone)
    means, variances, embeddings = repo.stacked()
    former = [t.clone() for t in (means, variances, embeddings)]
    room = len(repo._stack.buffers[0])
    assert room == 3 + repository.spare_rows(3) and repository.spare_rows(3) == repository.MIN_SPARE_ROWS
    calls = []

    def largest(m, v, e):
        calls.append(len(m))
        return float(m.abs().max())

    def extend(value, m, v, e):
        assert m.shape == (1, tiny_backbone.spec.num_params) and e.shape == (1, tiny_backbone.embed_dim)
        return max(value, largest(m, v, e))

    repo.derived("largest", largest, extend)
    repo.derived("norms", lambda m, v, e: e.norm(dim=-1))
    late = _late(tiny_backbone, "late", 1)
    repo.add(late)
    new = repo.stacked()
    assert new[0].shape == (4, tiny_backbone.spec.num_params)
    assert new[0].data_ptr() == means.data_ptr() and new[2].data_ptr() == embeddings.data_ptr()  # the same buffers
    assert all(torch.equal(t, f) for t, f in zip((means, variances, embeddings), former, strict=True))
    assert torch.equal(new[0][3], late.mean) and torch.equal(new[1][3], late.variance)
    assert repo["late"].mean.data_ptr() == new[0][3].data_ptr()  # the expert's tensors are the row
    assert repo.derived("largest", lambda *a: pytest.fail("extended, not worked out again")) == float(new[0].abs().max())
    assert calls == [3, 1]
    assert repo.derived("norms", lambda m, v, e: e.norm(dim=-1)).shape == (4,)  # no extend: worked out anew
    repo.save(tmp_path)
    assert _same_stack(repo, ExpertRepository.load(tmp_path))

    for i in range(room - 4):  # fill the rest: still the same buffers
        repo.add(_late(tiny_backbone, f"more{i}", 10 + i))
    assert repo.stacked()[0].data_ptr() == means.data_ptr() and len(repo) == room
    repo.add(_late(tiny_backbone, "over", 99))  # no room: stacked anew, with room again
    assert repo._stack is None
    assert repo.stacked()[0].data_ptr() != means.data_ptr() and len(repo._stack.buffers[0]) > len(repo)
    assert torch.equal(repo["over"].mean, _late(tiny_backbone, "over", 99).mean)
    kept = repo.stacked()[0]
    repo.remove("e1")  # a removal stacks anew: the former state's rows stay as they were
    assert repo._stack is None and repo.stacked()[0].data_ptr() != kept.data_ptr()
    assert torch.equal(kept[1], former[0][1]) and repo.names[1] == "e2"
    repo.save(tmp_path / "after")
    assert _same_stack(repo, ExpertRepository.load(tmp_path / "after"))


def test_a_failed_save_after_an_addition_into_a_spare_row_leaves_the_former_state(tiny_backbone, tmp_path, monkeypatch):
    repo = _repo(tiny_backbone)
    repo.save(tmp_path)
    before = [t.clone() for t in repo.stacked()]

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("expert_store.repository.write_bytes", fail)
    with pytest.raises(OSError, match="disk full"):
        repo.add_and_save(_late(tiny_backbone, "late", 1), tmp_path)
    assert repo.names == ["e0", "e1", "e2"]
    assert all(torch.equal(t, b) for t, b in zip(repo.stacked(), before, strict=True))
    monkeypatch.undo()
    repo.add_and_save(_late(tiny_backbone, "late", 1), tmp_path)
    assert _same_stack(repo, ExpertRepository.load(tmp_path))


def test_a_reload_that_begins_with_the_former_experts_takes_their_stack_over(tiny_backbone, tmp_path, caplog):
    """A follower's reload after experts were added elsewhere: the new state's stack is the former one's
    buffers, the rows added written after its own; the former state then takes no addition into them (its
    next one stacks anew, and the new state's rows stay as they were). A reload after a removal elsewhere
    stacks anew."""
    _repo(tiny_backbone).save(tmp_path)
    served = ExpertRepository.load(tmp_path)
    served.derived("largest", lambda m, v, e: float(m.abs().max()), lambda x, m, v, e: max(x, float(m.abs().max())))
    means = served.stacked()[0]
    other = ExpertRepository.load(tmp_path)
    for i in range(2):
        other.add_and_save(_late(tiny_backbone, f"late{i}", i), tmp_path)
    with caplog.at_level("INFO", logger="sglora.repository"):
        again = ExpertRepository.load(tmp_path, reuse=served)
    assert any("(3 rows of its stack taken over)" in m for m in caplog.messages)
    assert again.stacked()[0].data_ptr() == means.data_ptr() and _same_stack(again, other)
    assert again.derived("largest", lambda *a: pytest.fail("carried over")) == float(other.stacked()[0].abs().max())
    served.add(_late(tiny_backbone, "mine", 5))  # the former state: stacked anew, not into the new state's rows
    assert served.stacked()[0].data_ptr() != means.data_ptr() and _same_stack(again, other)

    other.remove_and_save("e1", tmp_path)
    later = ExpertRepository.load(tmp_path, reuse=again)
    assert later.stacked()[0].data_ptr() != means.data_ptr() and _same_stack(later, other)
    assert later.names == ["e0", "e2", "late0", "late1"]


def test_a_removal_takes_the_stack_made_ahead_for_its_state_and_stacks_anew_after_any_other_change(
    tiny_backbone, tmp_path, monkeypatch
):
    """:meth:`stack_without` copies the other experts into a new stack without touching the state it reads;
    the removal of that name from that state takes it as its stack (the experts' tensors its rows, the same
    values a plain removal and a load give). Made for another name, or before any other change since (an
    addition, a removal, a failed save), it is left and the next use stacks anew, as without it."""
    repo = _repo(tiny_backbone, n=5)
    repo.save(tmp_path)
    means = repo.stacked()[0]
    former = [t.clone() for t in repo.stacked()]
    prepared = repo.stack_without("e1")
    assert all(torch.equal(t, f) for t, f in zip(repo.stacked(), former, strict=True))  # the state it read
    assert repo.stacked()[0].data_ptr() == means.data_ptr() and prepared.names == ("e0", "e2", "e3", "e4")
    plain = _repo(tiny_backbone, n=5)
    plain.remove("e1")
    repo.remove_and_save("e1", tmp_path, prepared=prepared)
    assert repo._stack is prepared.stack and repo.stacked()[0].data_ptr() == prepared.stack.tensors[0].data_ptr()
    assert repo["e2"].mean.data_ptr() == repo.stacked()[0][1].data_ptr()  # the expert's tensors are its rows
    assert len(prepared.stack.buffers[0]) > 4  # with spare rows: an addition after it writes one
    assert _same_stack(repo, plain) and _same_stack(repo, ExpertRepository.load(tmp_path))
    repo.add_and_save(_late(tiny_backbone, "late", 1), tmp_path)
    assert repo.stacked()[0].data_ptr() == prepared.stack.tensors[0].data_ptr()

    for stale in (
        lambda r: (r.stack_without("e2"), r.add(_late(tiny_backbone, "other", 2)))[0],  # an addition since
        lambda r: (r.stack_without("e2"), r.remove("e3"))[0],  # a removal since
        lambda r: r.stack_without("e3"),  # another name
    ):
        r = _repo(tiny_backbone, n=5)
        made = stale(r)
        r.remove("e2", made)
        assert r._stack is None and r.stacked()[0].data_ptr() != made.stack.tensors[0].data_ptr()
        check = _repo(tiny_backbone, n=5)
        for name in [n for n in check.names if n not in r.names]:
            check.remove(name)
        for name in [n for n in r.names if n not in check.names]:
            check.add(r[name])
        assert _same_stack(r, check)

    other = _repo(tiny_backbone, n=5)
    other.remove("e2", _repo(tiny_backbone, n=5).stack_without("e2"))  # another repository's
    assert other._stack is None

    def fail(*a, **k):
        raise OSError("disk full")

    made = repo.stack_without("e0")
    monkeypatch.setattr("expert_store.repository.write_bytes", fail)
    with pytest.raises(OSError, match="disk full"):
        repo.remove_and_save("e0", tmp_path, prepared=made)
    assert repo.names == ["e0", "e2", "e3", "e4", "late"] and repo._stack is None  # rolled back, not taken
    monkeypatch.undo()
    repo.remove_and_save("e0", tmp_path, prepared=made)  # a failed save since: stacked anew
    assert repo._stack is None and _same_stack(repo, ExpertRepository.load(tmp_path))
    with pytest.raises(KeyError, match="nobody"):
        repo.stack_without("nobody")
