"""Small file helpers shared by every artefact writer: atomic writes and content hashes.

torch is imported only by :func:`safetensors_file`, so that the HTTP client (sglora/client.py) can use
the atomic writes without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def umask() -> int:
    """The process's file-creation mask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the classic two calls
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """Flushes a file's data, or a directory's entries (a rename in it), to the disk. A directory that
    cannot be opened for it (some filesystems, Windows) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p path``, each folder it makes flushed into its parent: a power cut after a file was renamed
    durably into a new folder would otherwise lose the folder, and the file with it."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    if not path.is_dir():  # named, as mkdir names it, not by a temporary file's path inside it
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(path))
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_path(folder.parent)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it over ``path`` only if the block succeeds. The
    file gets the mode a plain ``open`` would give it (0666 less the umask), not mkstemp's private 0600.
    Durable too: the data reaches the disk before the rename, and the rename before this returns (a power
    cut leaves the old file or the new one, never an empty one under the new name)."""
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        # Named by the file being written: a failed write ("[Errno 27] File too large") named no file, or the
        # temporary one beside it, which is gone by the time anyone reads the message.
        if e.errno is not None and e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror, os.fspath(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def json_bytes(obj: Any) -> bytes:
    """What :func:`write_json` writes."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, json_bytes(obj))


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _header(data: bytes) -> tuple[int, Any]:
    """(length, parsed JSON) of a safetensors file's header; ValueError when the bytes do not start with one."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        return n, json.loads(data[8 : 8 + n])
    except (struct.error, ValueError) as e:
        raise ValueError(f"unreadable safetensors header: {e}") from e


def safetensors_metadata(data: bytes, whole: bool = False) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes, from its JSON header alone (no tensor is read);
    {} when it has none. ValueError when the bytes do not start with a safetensors header, or, with
    ``whole``, when they are not exactly as long as the header's tensors say (a truncated or padded file)."""
    n, header = _header(data)
    metadata = (header.get("__metadata__") or {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("the safetensors header is not a JSON object with a __metadata__ map")
    if whole:
        try:
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"the safetensors header has a tensor without data_offsets: {e!r}") from e
        if len(data) != 8 + n + end:
            raise ValueError(f"{len(data)} bytes, but the safetensors header describes {8 + n + end}")
    return metadata


def safetensors_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file that depend on its content alone (see :func:`canonical_safetensors`)."""
    from safetensors.torch import save

    return canonical_safetensors(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes :func:`safetensors_file`'s bytes, atomically."""
    write_bytes(path, safetensors_file(tensors, metadata))


def output_path_problem(path: Path, flag: str) -> str | None:
    """Why a script's output ``path`` (given as ``flag``) could not be written, or None: checked before the
    work, so that a run's results are not lost to a path refused at its end."""
    if path.is_dir():
        return f"{flag} {path} is a directory: give a file name"
    parent = path.absolute().parent
    while not parent.exists():  # atomic_path creates the missing folders
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: cannot write in {parent}"
    return None


def figure_path_problem(path: Path, flag: str = "--out") -> str | None:
    """:func:`output_path_problem`, and a suffix matplotlib cannot write (none: PNG)."""
    from matplotlib.backend_bases import FigureCanvasBase

    if (problem := output_path_problem(path, flag)) is not None:
        return problem
    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in formats:
        return f"{flag} {path}: matplotlib cannot write .{fmt} files (use one of {', '.join(sorted(formats))})"
    return None


def save_safetensors_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` streamed to disk (large weights), with a failed write (disk full, a file
    size limit) raised as the OSError it is: safetensors raises its own error type, which reached users as a
    traceback. The file gets the mode a plain ``open`` would give it (0666 less the umask): safetensors
    creates it 0600, which a server running as another user than the trainer could not read."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"{path}: {e}") from e
    os.chmod(path, 0o666 & ~umask())


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted. safetensors writes ``__metadata__`` from a hash
    map, so the same tensors and metadata gave other bytes (and sha256s, and artefact versions) from one
    process to the next. Reordering keys keeps the header's length (compact JSON, UTF-8 as written), so
    the tensor data and its offsets stay where they were."""
    n, header = _header(data)
    canonical = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    if len(canonical) > n:  # not the compact JSON this was written in: leave the file as it is
        return data
    return data[:8] + canonical.ljust(n, b" ") + data[8 + n :]


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``path``; on success it replaces ``path`` whole (with the
    mode ``mkdir`` would give it, 0777 less the umask, not mkdtemp's private 0700)."""
    make_dirs(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        for f in sorted(tmp.rglob("*")):  # whatever wrote them, the files reach the disk before the rename
            fsync_path(f)
        fsync_path(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:  # an error or an interrupt between the two: the old folder goes back
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path, what: str) -> Any:
    return read_json_and_bytes(path, what)[0]


def read_json_and_digest(path: Path, what: str) -> tuple[Any, str]:
    """(parsed JSON, sha256 of the bytes parsed): one read, so the digest is that of what was loaded."""
    obj, data = read_json_and_bytes(path, what)
    return obj, hashlib.sha256(data).hexdigest()


def read_json_and_bytes(path: Path, what: str) -> tuple[Any, bytes]:
    """(parsed JSON, the bytes it was parsed from): one read."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8")), data
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text ({path}): {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({path}): {e}") from e
