"""sglora.io: files whose bytes depend on their content alone, and headers read whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from sglora.io import canonical_safetensors, safetensors_metadata

WRITE = """
import sys, torch
from sglora.io import write_safetensors
write_safetensors(__import__("pathlib").Path(sys.argv[1]), {"b": torch.ones(3, 2), "a": torch.arange(4)},
                  {f"key{i}": "välue" * i for i in range(24)})
"""


def test_the_same_tensors_and_metadata_give_the_same_bytes_in_any_process(tmp_path):
    """safetensors writes __metadata__ from a hash map seeded per process: without the sorted header a
    rerun of a pipeline stage changed every file's sha256 (and the service's artefact version)."""
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", WRITE, str(tmp_path / name)], check=True, timeout=60)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == (tmp_path / "c").read_bytes()
    back = load_file(str(tmp_path / "a"))
    assert torch.equal(back["a"], torch.arange(4)) and torch.equal(back["b"], torch.ones(3, 2))
    assert safetensors_metadata((tmp_path / "a").read_bytes(), whole=True)["key3"] == "välue" * 3


def test_a_header_read_whole_refuses_truncated_and_padded_files():
    data = canonical_safetensors(save({"x": torch.ones(4)}, metadata={"format": "t"}))
    assert safetensors_metadata(data, whole=True) == {"format": "t"}
    for bad in (data[:-1], data + b"\0", b"\x05" + b"\0" * 7 + b"{}"):
        with pytest.raises(ValueError):
            safetensors_metadata(bad, whole=True)


def test_a_failed_weights_write_is_an_os_error(tmp_path):
    """safetensors raises its own error type for a full disk (os error 28), which reached users as a traceback
    from the experts stage (saving the backbone); the CLI reports an OSError as a message."""
    from sglora.io import save_safetensors_file

    code = (  # a file size limit (ulimit -f), in a child: the same failed write as a full disk
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from sglora.io import save_safetensors_file\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    save_safetensors_file({'w': torch.zeros(1_000_000)}, Path(sys.argv[1]))\n"
        "except OSError as e:\n"
        "    print('OSError:', e)\n"
    )
    target = tmp_path / "big.safetensors"
    p = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert p.stdout.startswith(f"OSError: {target}: ") and "File too large" in p.stdout, p.stdout + p.stderr
    save_safetensors_file({"w": torch.ones(3)}, tmp_path / "w.safetensors", {"k": "v"})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], torch.ones(3))


def test_a_failed_atomic_write_names_the_file_it_was_writing(tmp_path):
    """A write cut short by a file size limit said "[Errno 27] File too large" and no file (sglora evaluate
    printed just that), or named the temporary file beside the target, gone by then."""
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from sglora.io import write_bytes\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    write_bytes(Path(sys.argv[1]), b'x' * (1 << 20))\n"
        "except OSError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    target = tmp_path / "eval" / "results.json"
    p = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == f"OSError [Errno 27] File too large: '{target}'", p.stdout + p.stderr
    assert sorted(q.name for q in target.parent.iterdir()) == []  # nothing half-written left


def test_the_folders_an_atomic_write_makes_are_flushed_into_their_parents(tmp_path, monkeypatch):
    """A file renamed durably into a folder the write had just made could still be lost with the folder: the
    new folder's own entry was never flushed into its parent."""
    import sglora.io as sio

    flushed = []
    real = sio.fsync_path
    monkeypatch.setattr(sio, "fsync_path", lambda p: (flushed.append(Path(p)), real(p)))
    sio.write_json(tmp_path / "a" / "b" / "c.json", {"x": 1})
    assert (tmp_path / "a" / "b" / "c.json").is_file()
    assert tmp_path in flushed and tmp_path / "a" in flushed and tmp_path / "a" / "b" in flushed  # each new folder's parent


def test_a_replacement_that_fails_between_its_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """atomic_dir moves the old folder aside, then the new one in: an error (or Ctrl-C) between the two left
    the folder only as .NAME.old until the next pipeline run."""
    import os

    import sglora.io as sio

    folder = tmp_path / "repository"
    folder.mkdir()
    (folder / "index.json").write_text("old")
    real = os.replace

    def second_fails(src, dst):
        if Path(dst) == folder and Path(src).name.endswith(".tmp"):  # the new copy's rename, not the undo
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(sio.os, "replace", second_fails)
    with pytest.raises(KeyboardInterrupt), sio.atomic_dir(folder) as tmp:
        (tmp / "index.json").write_text("new")
    assert (folder / "index.json").read_text() == "old" and not (tmp_path / ".repository.old").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["repository"]  # nor the temporary copy


def test_a_write_under_a_file_names_that_file(tmp_path):
    from sglora.io import write_json

    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError) as e:
        write_json(tmp_path / "afile" / "x.json", {})
    assert e.value.filename == str(tmp_path / "afile")
