"""The expert repository (paper §3.2.2, eq. 5): per expert its mean and variance LoRA and description embedding.

On disk::

    repository/
      repository.json                 index: LoRA spec, embedding size, backbone fingerprint, experts + sha256
      experts/<name>.safetensors      {"mean": (P,), "variance": (P,), "embedding": (D,)}

One file per expert makes adding and removing an expert an atomic file write plus an
atomic rewrite of the index; a reader never sees a half-written expert. A change holds an exclusive lock
on ``repository/.lock`` and refuses (:class:`RepositoryChanged`) when the index on disk is no longer the
one this object loaded or last wrote (for a repository made in memory: when the directory holds one at
all): two processes serving one directory cannot undo each other's changes, and a new repository saved
over an existing one cannot drop its experts from the index. A load takes no lock (a pipeline reads the
repository under its own writer's lock); where a change replaced the index while it read the files (an
expert file removed or replaced after the index named it), it reads the new index again. The index records each
expert file's sha256 as written or as verified at load, never re-read from disk: a file corrupted on disk
since stays refused at the next load. Loading removes the temporary files a killed writer left and names
expert files the index does not list.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import numbers
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from models.lora import LoraSpec, check_finite
from sglora import __version__
from sglora.io import json_bytes, make_dirs, read_json_and_digest, safetensors_file, sha256_file, umask, write_bytes

INDEX_FILE = "repository.json"
EXPERTS_DIR = "experts"
FORMAT = "sglora-expert-repository"
FORMAT_VERSION = 1
LOCK_FILE = ".lock"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would let a final newline through
log = logging.getLogger("sglora.repository")


class RepositoryChanged(RuntimeError):
    """The repository on disk changed since this object loaded or wrote it (another process changed it)."""


class RepositoryBusy(RuntimeError):
    """Another process held the repository's lock longer than a change was allowed to wait for it."""


LOCK_POLL_S = 0.05  # between tries of a lock waited for with a timeout
REOPEN_TRIES = 3  # of a lock file found replaced once locked (see locked)
# Rows a stack is made with beyond its experts, for experts added later: an addition then writes one row and
# takes the stack's first E + 1 rows, instead of copying every expert into a new stack (885 MB and 0.5-1.3 s
# at 1,000 experts of ViT-B-16's shape). Rows never written are never touched, so the kernel gives them no
# pages: they cost address space, not memory (docs/benchmarks.md).
MIN_SPARE_ROWS = 16


def spare_rows(n: int) -> int:
    """Rows beyond ``n`` experts that a new stack holds for additions: a quarter more, at least 16."""
    return max(MIN_SPARE_ROWS, n // 4)


_ROW_KEYS = itertools.count()  # ExpertRepository.row_keys: unique within the process


@contextmanager
def locked(directory: Path, wait: bool = True, name: str = LOCK_FILE, timeout_s: float | None = None) -> Iterator[bool]:
    """Holds the repository directory's exclusive advisory lock (``flock`` on ``.lock``): one writer at a
    time across processes. The file is opened for writing where allowed (on NFS an exclusive ``flock`` is
    a byte-range lock, which needs that), else read-only (enough on local filesystems: a ``.lock`` another
    user created and left readable does not stop a writer allowed in the directory). ``wait=False`` yields
    False at once instead of waiting when another process holds it; ``timeout_s`` yields False once that
    long has passed without it. ``name``: another lock file of the directory. A lock file its holder removed
    before this process got it is not held: the file now at the path is locked instead (FileNotFoundError
    when the directory went with it)."""
    path = directory / name
    fd = _open_lock(path)
    deadline = None if timeout_s is None or not wait else time.monotonic() + timeout_s
    reopened = 0
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait and deadline is None else fcntl.LOCK_NB))
                held = True
            except BlockingIOError:
                held = False
            # Unlinked by the holder it waited for: two would hold it. Three tries at most: where stat and fstat
            # never agree (some FUSE or overlay mounts), the file opened is held as before.
            if held and reopened < REOPEN_TRIES and not _is_file_at(fd, path):
                os.close(fd)
                fd = -1
                fd = _open_lock(path)
                reopened += 1
                continue
            if held or deadline is None or time.monotonic() >= deadline:
                break
            time.sleep(LOCK_POLL_S)
        yield held  # outside the except: an error raised by the caller does not chain the BlockingIOError
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (at.st_dev, at.st_ino) == (held.st_dev, held.st_ino)


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
            raise
        return os.open(path, os.O_RDONLY)


def check_name(name: str) -> str:
    """Expert names become file names: letters, digits, '.', '_', '-', at most 64, no leading dot."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid expert name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting alnum")
    return name


Extend = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class _Stack:
    """A state's stack: ``tensors`` (means (E, P), variances (E, P), embeddings (E, D)) are the first E rows
    of ``buffers``; ``kept`` holds what :meth:`ExpertRepository.derived` worked out from them, by name, with
    how to extend it by rows added. ``buffers`` is None where this stack takes no addition (its rows beyond
    E are full, or another stack took them over): the only stack that may write rows beyond E, so those rows
    are never part of a stack anyone holds."""

    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    kept: dict[str, tuple[Any, Extend | None]]
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _empty_stack(n: int, num_params: int, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers for ``n`` experts and :func:`spare_rows` more, not filled."""
    rows = n + spare_rows(n)
    return torch.empty(rows, num_params), torch.empty(rows, num_params), torch.empty(rows, embed_dim)


@dataclass(frozen=True)
class PreparedRemoval:
    """The stack a removal of ``name`` from one state of a repository makes (:meth:`ExpertRepository.stack_without`),
    worked out ahead. ``changes`` and ``names``: the state it is for, checked by :meth:`ExpertRepository.remove`."""

    repository: ExpertRepository
    changes: int
    name: str
    names: tuple[str, ...]
    stack: _Stack


@dataclass(frozen=True)
class Expert:
    name: str
    description: str
    mean: torch.Tensor  # (P,)
    variance: torch.Tensor  # (P,) element-wise, over the expert's M snapshots
    embedding: torch.Tensor  # (D,) text embedding of the description
    num_snapshots: int

    @classmethod
    def from_snapshots(cls, name: str, description: str, snapshots: torch.Tensor, embedding: torch.Tensor) -> Expert:
        """snapshots: (M, P) flattened LoRAs of the last M epochs."""
        if snapshots.dim() != 2 or snapshots.shape[0] < 1:
            raise ValueError(f"expert {name}: snapshots must be (M, P) with M >= 1, got {tuple(snapshots.shape)}")
        check_finite(snapshots, f"expert {name} snapshots")
        var = snapshots.var(dim=0, unbiased=False) if snapshots.shape[0] > 1 else torch.zeros(snapshots.shape[1])
        return cls(name, description, snapshots.mean(0), var, embedding.float(), int(snapshots.shape[0]))


class ExpertRepository:
    """In-memory view of the repository, stacked for fast top-K: means/variances (E, P), embeddings (E, D).

    Once stacked, each expert's tensors are rows of the stack (views), so the values are held once: on
    open_clip ViT-B-16's shape a thousand experts' means and variances take 0.9 GB, not 1.8. Treat them as
    read-only: a change in place would change the stack behind what an engine worked out from it; remove the
    expert and add its new values instead. A stack has spare rows (:func:`spare_rows`): an expert added
    while there is room is written into the next one, and the new state's stack is the old one's rows and
    that row (the old state's tensors unchanged); a removal, or an addition with no room, stacks anew (a
    removal may take a stack made ahead instead: :meth:`stack_without`)."""

    def __init__(
        self,
        spec: LoraSpec,
        embed_dim: int,
        backbone_fingerprint: str,
        experts: list[Expert] | None = None,
        provenance: dict | None = None,
    ):
        self.spec = spec
        self.embed_dim = embed_dim
        self.backbone_fingerprint = backbone_fingerprint
        # What built it, as its builder says (the pipeline: the settings its experts were trained with), a
        # JSON object kept through every later change; None: not said.
        self.provenance = provenance
        self._experts: dict[str, Expert] = {}
        # Built on demand; a removal drops it, an addition extends it where it has room (see _Stack)
        self._stack: _Stack | None = None
        self._stack_lock = threading.Lock()  # two model threads after a change stack once, and get one stack
        self._row_keys: dict[str, int] = {}  # see row_keys
        self._index_sha256: str | None = None  # of the index this object loaded or last wrote
        # Of each expert's file as this object wrote it, or as its load verified it (or, unverified, as the
        # index said): what the next index records. A file is never hashed again from disk for an index, which
        # would pin whatever the file became meanwhile (bytes corrupted on disk, loaded no more, approved).
        self._file_sha256: dict[str, str] = {}
        self._changes = 0  # see changes
        for e in experts or []:
            self.add(e)

    # ---- contents ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._experts)

    def __len__(self) -> int:
        return len(self._experts)

    def __contains__(self, name: str) -> bool:
        return name in self._experts

    def __getitem__(self, name: str) -> Expert:
        return self._experts[name]

    @property
    def index_sha256(self) -> str | None:
        """The sha256 of the index this object loaded or last wrote; None: it has written none."""
        return self._index_sha256

    @property
    def changes(self) -> int:
        """Experts added or removed since this object was made (a load adds each): equal values, the same
        experts. For what is worked out per state of the repository and must survive an empty one (the
        artefact version: :attr:`sglora.artifacts.Artifacts.version`)."""
        return self._changes

    def row_keys(self) -> list[int]:
        """A key per expert, in :attr:`names` order (the rows of :meth:`stacked`), new for every expert
        added, within the process: an expert removed and added again gets a new one (a :meth:`load` that
        takes an expert from an earlier state, its file unchanged, keeps that state's key). For caches of values
        worked out per expert (the engine's generator features), which then survive other experts' changes."""
        return [self._row_keys[n] for n in self._experts]

    def add(self, expert: Expert) -> None:
        """Adds an expert in memory (:meth:`add_and_save` also persists it). Its tensors are kept as float32
        on the CPU, as loading gives them: the engine's merges and samples come out float32 whatever the
        caller's tensors were."""
        self._add(expert)

    def _add(self, expert: Expert, check_values: bool = True) -> None:
        """:meth:`add`; ``check_values=False`` skips the passes over the values (finite, variances >= 0)
        for an expert taken from a repository that checked them (:meth:`load`'s ``reuse``)."""
        check_name(expert.name)
        if expert.name in self._experts:
            raise ValueError(f"expert {expert.name!r} already exists")
        if not isinstance(expert.description, str):
            raise TypeError(f"expert {expert.name!r}: description must be a str, got {type(expert.description).__name__}")
        if not expert.description.strip():
            raise ValueError(f"expert {expert.name!r}: description must not be empty")
        for what in ("mean", "variance", "embedding"):
            if not isinstance(value := getattr(expert, what), torch.Tensor) or not value.is_floating_point():
                got = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"expert {expert.name!r}: {what} must be a floating-point torch.Tensor, got {got}")
        n = expert.num_snapshots
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"expert {expert.name!r}: num_snapshots must be an integer >= 1, got {n!r}")
        p = self.spec.num_params
        if tuple(expert.mean.shape) != (p,) or tuple(expert.variance.shape) != (p,):
            raise ValueError(
                f"expert {expert.name!r}: mean/variance must have shape ({p},) for this repository's LoRA spec, "
                f"got {tuple(expert.mean.shape)} / {tuple(expert.variance.shape)}"
            )
        if tuple(expert.embedding.shape) != (self.embed_dim,):
            raise ValueError(f"expert {expert.name!r}: embedding must have shape ({self.embed_dim},)")
        if check_values:
            for what, t in (("mean", expert.mean), ("variance", expert.variance), ("embedding", expert.embedding)):
                check_finite(t, f"expert {expert.name!r} {what}")
            if (expert.variance < 0).any():
                raise ValueError(f"expert {expert.name!r}: variance has negative entries")
        self._experts[expert.name] = replace(
            expert,
            num_snapshots=int(n),
            **{k: getattr(expert, k).detach().float().cpu() for k in ("mean", "variance", "embedding")},
        )
        self._file_sha256.pop(expert.name, None)  # in memory only, until written
        self._row_keys[expert.name] = next(_ROW_KEYS)
        self._stack = self._appended(self._stack, expert.name)
        self._changes += 1

    def _appended(self, stack: _Stack | None, name: str) -> _Stack | None:
        """``stack`` with the expert ``name`` (just added, the last) written into its next spare row; the
        expert's tensors become that row. None where there is no stack or no room: the next use stacks anew."""
        if stack is None or stack.buffers is None:
            return None
        i = len(stack.tensors[0])
        if i != len(self._experts) - 1 or i >= len(stack.buffers[0]):
            return None
        e = self._experts[name]
        rows = tuple(b[i] for b in stack.buffers)
        for row, value in zip(rows, (e.mean, e.variance, e.embedding), strict=True):
            row.copy_(value)
        added = tuple(b[i : i + 1] for b in stack.buffers)
        kept = {k: (extend(value, *added), extend) for k, (value, extend) in stack.kept.items() if extend is not None}
        self._experts[name] = replace(e, mean=rows[0], variance=rows[1], embedding=rows[2])
        return _Stack(tuple(b[: i + 1] for b in stack.buffers), kept, stack.buffers)

    def stack_without(self, name: str) -> PreparedRemoval:
        """The stack that :meth:`remove` of ``name`` would make (every other expert copied into new buffers, with
        spare rows), worked out now from this state's rows, which it only reads. For a caller whose changes
        hold everything else back (a server: its generations wait for a change) to make the copy beforehand,
        beside them: 0.5 s at 1,000 experts of ViT-B-16's shape. Safe beside readers, not beside a change:
        one made meanwhile only makes it unusable (:meth:`remove` then stacks anew)."""
        changes = self._changes  # before the experts: a change after this read makes the two disagree
        experts = list(self._experts.values())  # one C call: a consistent list of one state
        if name not in {e.name for e in experts}:
            raise KeyError(f"no expert named {name!r}")
        es = [e for e in experts if e.name != name]
        if not es:
            raise ValueError("the expert repository would be empty")
        buffers = _empty_stack(len(es), self.spec.num_params, self.embed_dim)
        tensors = tuple(b[: len(es)] for b in buffers)
        for part, what in zip(tensors, ("mean", "variance", "embedding"), strict=True):
            torch.stack([getattr(e, what) for e in es], out=part)
        return PreparedRemoval(self, changes, name, tuple(e.name for e in es), _Stack(tensors, {}, buffers))

    def remove(self, name: str, prepared: PreparedRemoval | None = None) -> Expert:
        """Removes an expert in memory (:meth:`remove_and_save` also persists it). ``prepared``: from
        :meth:`stack_without` of this name; taken as the new stack where this repository has not changed since
        it was made, else the next use stacks anew, as without it."""
        if name not in self._experts:
            raise KeyError(f"no expert named {name!r}")
        changes = self._changes
        self._stack = None
        self._file_sha256.pop(name, None)
        self._row_keys.pop(name, None)
        e = self._experts.pop(name)
        self._changes += 1
        if (
            prepared is not None
            and prepared.repository is self
            and (prepared.changes, prepared.name, prepared.names) == (changes, name, tuple(self._experts))
        ):
            tensors = prepared.stack.tensors
            # The experts' tensors become the prepared stack's rows (the same values), as a stacking makes them.
            self._experts = {
                n: replace(x, mean=tensors[0][i], variance=tensors[1][i], embedding=tensors[2][i])
                for i, (n, x) in enumerate(self._experts.items())
            }
            self._stack = prepared.stack
        # Its own copies: rows of the stack would keep the whole former stack alive as long as it is held.
        return replace(e, mean=e.mean.clone(), variance=e.variance.clone(), embedding=e.embedding.clone())

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means (E, P), variances (E, P), embeddings (E, D)), in :attr:`names` order."""
        return self._stacked().tensors

    def derived(
        self, name: str, compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any], extend: Extend | None = None
    ) -> Any:
        """``compute(means, variances, embeddings)`` of :meth:`stacked`, worked out once per state of the
        repository under ``name`` (e.g. the embeddings' unit rows, every request's): kept with the stack it came
        from, and dropped with it at the next change. ``extend(value, means, variances, embeddings)``, where
        given, gives the value for the stack with those rows (one expert's, (1, P), (1, P), (1, D)) added
        after its own, without going over every row again; it is kept through additions that fill a spare row
        (:func:`spare_rows`), and must give what ``compute`` would. Two threads asking at once may both
        compute it."""
        stack = self._stacked()
        if name not in stack.kept:
            stack.kept[name] = (compute(*stack.tensors), extend)
        return stack.kept[name][0]

    def _stacked(self) -> _Stack:
        if not self._experts:
            raise ValueError("the expert repository is empty")
        stack = self._stack
        if stack is None:
            with self._stack_lock:
                stack = self._stack
                if stack is None:
                    es = list(self._experts.values())
                    buffers = _empty_stack(len(es), self.spec.num_params, self.embed_dim)
                    tensors = tuple(b[: len(es)] for b in buffers)
                    for part, what in zip(tensors, ("mean", "variance", "embedding"), strict=True):
                        torch.stack([getattr(e, what) for e in es], out=part)
                    # The experts' tensors become the stack's rows (the same values): the earlier copies go.
                    self._experts = {
                        e.name: replace(e, mean=tensors[0][i], variance=tensors[1][i], embedding=tensors[2][i])
                        for i, e in enumerate(es)
                    }
                    self._stack = stack = _Stack(tensors, {}, buffers)
        return stack

    # ---- persistence -------------------------------------------------------------------------
    def _index(self, digests: dict[str, str] | None = None) -> dict:
        digests = self._file_sha256 if digests is None else digests
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "code_version": __version__,
            "lora": self.spec.to_dict(),
            "lora_fingerprint": self.spec.fingerprint(),
            "embed_dim": self.embed_dim,
            "backbone_fingerprint": self.backbone_fingerprint,
            **({} if self.provenance is None else {"provenance": self.provenance}),
            "experts": [
                {
                    "name": e.name,
                    "description": e.description,
                    "num_snapshots": e.num_snapshots,
                    "file": f"{EXPERTS_DIR}/{e.name}.safetensors",
                    "sha256": digests[e.name],
                }
                for e in self._experts.values()
            ],
        }

    def _check_written(self) -> None:
        """ValueError naming the experts added in memory and not written since (an index must not name them)."""
        unwritten = [n for n in self._experts if n not in self._file_sha256]
        if unwritten:
            raise ValueError(
                f"experts {unwritten} were added in memory and never written: save() the repository to write them all"
            )

    @staticmethod
    def _expert_bytes(e: Expert) -> bytes:
        tensors = {"mean": e.mean, "variance": e.variance, "embedding": e.embedding}
        metadata = {"name": e.name, "description": e.description, "num_snapshots": str(e.num_snapshots)}
        return safetensors_file(tensors, metadata)

    def _write_expert(self, directory: Path, e: Expert) -> None:
        """Writes an expert's file (atomic; bytes that depend on its content alone) and keeps their sha256."""
        data = self._expert_bytes(e)
        write_bytes(directory / EXPERTS_DIR / f"{e.name}.safetensors", data)
        self._file_sha256[e.name] = hashlib.sha256(data).hexdigest()

    def save(self, directory: str | Path) -> None:
        """Writes every expert and the index into a fresh directory (created if missing), or into the one
        this repository was loaded from, under the lock. A directory holding another repository's index
        (one this object did not load or write, or one changed since) is refused with
        :class:`RepositoryChanged` before anything is written: its experts would drop out of the index.
        The files of experts the index no longer names (removed in memory since the load) are deleted."""
        directory = Path(directory)
        make_dirs(directory)
        with locked(directory):
            if (directory / INDEX_FILE).exists():
                self._check_unchanged(directory)
            for e in self._experts.values():
                self._write_expert(directory, e)
            self._write_index(directory)
            # The files of experts removed in memory since the load: the index no longer names them.
            for path in (directory / EXPERTS_DIR).glob("*.safetensors"):
                if path.stem not in self._experts:
                    path.unlink()
                    log.info("%s: removed %s (not in the repository saved)", directory, path.name)

    def index_bytes(self) -> bytes:
        """The bytes of the index this repository writes: those of its ``repository.json`` once saved with
        this code (an index loaded as written by another release differs in its ``code_version``)."""
        return json_bytes(self._index())

    def state_index_bytes(self) -> bytes:
        """:meth:`index_bytes`, where an expert added in memory and not written yet is named by the sha256 of
        the file it would be written as: bytes that name this state of the experts, written or not."""
        digests = {
            n: self._file_sha256.get(n) or hashlib.sha256(self._expert_bytes(e)).hexdigest() for n, e in self._experts.items()
        }
        return json_bytes(self._index(digests))

    def _write_index(self, directory: Path) -> None:
        # The digest of the bytes written, known before the rename: nothing can fail after it.
        data = self.index_bytes()
        digest = hashlib.sha256(data).hexdigest()
        write_bytes(directory / INDEX_FILE, data)
        self._index_sha256 = digest

    def _check_unchanged(self, directory: Path) -> None:
        """Under the lock: RepositoryChanged unless the index on disk is the one this object last saw."""
        path = directory / INDEX_FILE
        seen = self._index_sha256
        if seen is None:  # made in memory: a fresh directory only
            if path.exists():
                raise RepositoryChanged(
                    f"{directory} holds an expert repository this object did not load; load it "
                    "(ExpertRepository.load) to change it, or save into a new directory"
                )
            return
        if not path.exists() or sha256_file(path) != seen:
            raise RepositoryChanged(
                f"{path} changed since this repository was loaded (another process changed the experts); "
                "load it again before changing it"
            )

    def _change_target(self, directory: str | Path) -> Path:
        """The folder of a change, made where this repository was made in memory. One this repository was loaded
        from or saved to must hold an index (a missing folder or a file is :class:`RepositoryChanged`, as a
        changed index is); the lock itself would fail there with the lock file's path."""
        directory = Path(directory)
        if self._index_sha256 is None:
            make_dirs(directory)
        elif not (directory / INDEX_FILE).is_file():
            raise RepositoryChanged(
                f"{directory} holds no expert repository ({INDEX_FILE}); this repository was loaded from or saved to "
                "another folder: change it there, or save() it here first"
            )
        return directory

    def add_and_save(self, expert: Expert, directory: str | Path, lock_timeout_s: float | None = None) -> None:
        """Adds an expert and persists it: expert file first, then the index, both atomic, under the lock.
        ``directory``: the one this repository was loaded from or saved to, or (for a repository made in
        memory) a fresh one, created if missing; else :class:`RepositoryChanged`. ``lock_timeout_s``: at most
        that long waiting for the lock (None: as long as it takes), then :class:`RepositoryBusy`, nothing changed."""
        directory = self._change_target(directory)
        with locked(directory, timeout_s=lock_timeout_s) as held:
            _check_held(held, directory, lock_timeout_s)
            self._check_unchanged(directory)
            self._check_written()  # before anything is written
            self.add(expert)
            path = directory / EXPERTS_DIR / f"{expert.name}.safetensors"
            try:
                self._write_expert(directory, self._experts[expert.name])  # the float32 CPU copy add() keeps
                self._write_index(directory)
            except BaseException:
                self._experts.pop(expert.name, None)
                self._file_sha256.pop(expert.name, None)
                self._row_keys.pop(expert.name, None)
                self._stack = None
                path.unlink(missing_ok=True)  # the index never named it
                raise

    def remove_and_save(
        self, name: str, directory: str | Path, lock_timeout_s: float | None = None, prepared: PreparedRemoval | None = None
    ) -> Expert:
        """Removes an expert: index first (atomic), then its file, under the lock (``lock_timeout_s``: see
        :meth:`add_and_save`; ``prepared``: see :meth:`remove`)."""
        directory = self._change_target(directory)
        with locked(directory, timeout_s=lock_timeout_s) as held:
            _check_held(held, directory, lock_timeout_s)
            self._check_unchanged(directory)
            self._check_written()
            before, digests, keys = dict(self._experts), dict(self._file_sha256), dict(self._row_keys)
            expert = self.remove(name, prepared)
            try:
                self._write_index(directory)
            except BaseException:
                self._experts, self._file_sha256, self._row_keys = before, digests, keys  # same experts, same order
                self._stack = None
                raise
            (directory / EXPERTS_DIR / f"{name}.safetensors").unlink(missing_ok=True)
        return expert

    def _hand_over_stack(self, names: list[str], sha256: dict[str, str]) -> _Stack | None:
        """For a load of a later state (:meth:`load`'s ``reuse``) that begins with this one's experts, files
        unchanged, in the same order, and fits in this stack's buffers: this state's stack, whose buffers'
        rows beyond its own become the new state's. This stack then takes no addition. None otherwise."""
        with self._stack_lock:
            stack, e = self._stack, len(self._experts)
            if stack is None or stack.buffers is None or len(stack.tensors[0]) != e or len(names) > len(stack.buffers[0]):
                return None
            if names[:e] != list(self._experts) or any(self._file_sha256.get(n) != sha256[n] for n in names[:e]):
                return None
            self._stack = replace(stack, buffers=None)
            return stack

    @classmethod
    def load(
        cls,
        directory: str | Path,
        verify: bool = True,
        expect_spec: LoraSpec | None = None,
        reuse: ExpertRepository | None = None,
    ) -> ExpertRepository:
        """Loads and checks every expert file; ``expect_spec`` refuses a repository of another LoRA layout.

        ``reuse``: an earlier state of this directory held in memory (a server's, before another process
        changed the directory). An expert it holds under the same name whose file's sha256, as it wrote or
        verified it, is the one the new index names is taken from it, with its row key (:meth:`row_keys`),
        instead of read from disk: after one expert is added to a thousand, one file is read, not a thousand
        and one, and what was worked out per expert survives. It is used only where its LoRA layout, embedding
        size and backbone are the index's."""
        directory = Path(directory)
        attempt = 0
        while True:
            attempt += 1
            index, index_sha256 = read_json_and_digest(directory / INDEX_FILE, "expert repository index")
            if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
                raise ValueError(f"{directory / INDEX_FILE}: not a version-{FORMAT_VERSION} {FORMAT} index")
            try:
                repo = cls._from_index(directory, index, index_sha256, verify, expect_spec, reuse)
            except (KeyError, TypeError, AttributeError) as e:  # the index is not pinned by the manifest: edited by hand?
                what = f"field {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{directory / INDEX_FILE}: malformed index ({type(e).__name__}: {what})") from e
            except (FileNotFoundError, ExpertFileChanged):
                # Another process's change (index first, then the file) between reading the index and the file:
                # the index is another one now. Where it is still the one read, the file is missing or corrupt.
                # A moment without an index counts as a change: the pipeline swaps in a rebuilt folder.
                if attempt < LOAD_ATTEMPTS and _index_digest(directory) != index_sha256:
                    log.info("%s: the expert repository changed while it was read; reading it again", directory)
                    time.sleep(LOCK_POLL_S)
                    continue
                raise
            _tidy(directory, set(repo.names), index_sha256)
            return repo

    @classmethod
    def _from_index(
        cls,
        directory: Path,
        index: dict,
        index_sha256: str,
        verify: bool,
        expect_spec: LoraSpec | None,
        reuse: ExpertRepository | None = None,
    ) -> ExpertRepository:
        spec = LoraSpec.from_dict(index["lora"])
        if spec.fingerprint() != index["lora_fingerprint"]:
            raise ValueError(f"{directory / INDEX_FILE}: LoRA spec does not match its fingerprint")
        if expect_spec is not None and spec.fingerprint() != expect_spec.fingerprint():
            raise ValueError(
                f"{directory}: expert LoRA layout (rank {spec.rank}, {spec.num_params} params) does not match "
                f"the backbone's (rank {expect_spec.rank}, {expect_spec.num_params} params)"
            )
        repo = cls(spec, int(index["embed_dim"]), index["backbone_fingerprint"], provenance=index.get("provenance"))
        if reuse is not None and (
            reuse.spec.fingerprint() != spec.fingerprint()
            or reuse.embed_dim != repo.embed_dim
            or reuse.backbone_fingerprint != repo.backbone_fingerprint
        ):
            reuse = None  # another layout or backbone: nothing of it is this repository's
        # Each expert is copied into the stack as it is loaded and then kept as its rows: the file's own tensors
        # go before the next file is read, so loading needs the stack and one expert, not every expert twice
        # (freed small blocks stay in the process's heap: E x P x 8 bytes more resident after start-up).
        names = [entry["name"] for entry in index["experts"]]
        n, buffers, handed, reused = len(names), None, None, 0
        if reuse is not None:
            handed = reuse._hand_over_stack(names, {e["name"]: e["sha256"] for e in index["experts"]})
        kept_rows = 0 if handed is None else len(handed.tensors[0])
        if handed is not None:
            buffers = handed.buffers
        elif n:
            buffers = _empty_stack(n, spec.num_params, repo.embed_dim)
        for i, entry in enumerate(index["experts"]):
            name = check_name(entry["name"])
            path = directory / EXPERTS_DIR / f"{name}.safetensors"
            kept = reuse is not None and reuse._file_sha256.get(name) == entry["sha256"] and name in reuse._experts
            if kept:
                e = reuse._experts[name]
                t = {"mean": e.mean, "variance": e.variance, "embedding": e.embedding}
            else:
                try:
                    data = path.read_bytes()  # one read: the bytes verified are the bytes loaded
                except FileNotFoundError:
                    raise FileNotFoundError(f"expert file missing: {path}") from None
                if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise ExpertFileChanged(f"expert file is corrupt (sha256 mismatch): {path}")
                try:
                    t = load_safetensors(data)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"expert file is unreadable: {path}: {e}") from e
                missing = {"mean", "variance", "embedding"} - set(t)
                if missing:
                    raise ValueError(f"expert file {path} lacks tensors {sorted(missing)}")
            try:
                expert = Expert(name, entry["description"], t["mean"], t["variance"], t["embedding"], entry["num_snapshots"])
                repo._add(expert, check_values=not kept)  # a kept expert's values were checked when first read
            except (TypeError, ValueError) as e:  # an index edited by hand: its description or snapshot count
                raise ValueError(f"{directory / INDEX_FILE}: {e}") from None
            e = repo._experts[name]
            rows = [b[i] for b in buffers]
            if i >= kept_rows:  # the rows handed over already hold these values
                for row, value in zip(rows, (e.mean, e.variance, e.embedding), strict=True):
                    row.copy_(value)
            repo._experts[name] = replace(e, mean=rows[0], variance=rows[1], embedding=rows[2])
            repo._file_sha256[name] = str(entry["sha256"])
            if kept:
                repo._row_keys[name] = reuse._row_keys[name]
                reused += 1
        if reuse is not None:
            log.info(
                "%s: %d of %d experts taken from memory (%d rows of its stack taken over), the others read",
                directory,
                reused,
                n,
                kept_rows,
            )
        if buffers is not None:  # the experts' rows, in the index's order (add() cleared the stack)
            kept_values = {}
            for key, (value, extend) in ({} if handed is None else handed.kept).items():
                if extend is not None:  # what the handed-over state worked out, extended by the rows added
                    for i in range(kept_rows, n):
                        value = extend(value, *(b[i : i + 1] for b in buffers))
                    kept_values[key] = (value, extend)
            repo._stack = _Stack(tuple(b[:n] for b in buffers), kept_values, buffers if n < len(buffers[0]) else None)
        repo._index_sha256 = index_sha256
        return repo


class ExpertFileChanged(ValueError):
    """An expert file's bytes are not those its index names (corrupt, or replaced by a change since)."""


LOAD_ATTEMPTS = 5  # reads of an index that other processes' changes keep replacing mid-load


def _index_digest(directory: Path) -> str | None:
    try:
        return hashlib.sha256((directory / INDEX_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def _check_held(held: bool, directory: Path, timeout_s: float | None) -> None:
    if not held:
        raise RepositoryBusy(
            f"{directory}: another process held the expert repository's lock for over {timeout_s:g} s "
            "(changing its experts, or rebuilding it); nothing was changed"
        )


def _tidy(directory: Path, names: set[str], index_sha256: str) -> None:
    """Under the lock, where no other process holds it (else it does not wait, and does nothing): removes the
    temporary files a writer killed mid-write left and, while the index is still the one loaded (``names``,
    ``index_sha256``), names expert files it does not list (a writer killed between file and index; a file
    another process is adding is not one). Skipped where the directory is read-only."""
    try:
        with locked(directory, wait=False) as held:
            if not held:
                return
            for tmp in [*directory.glob(".*.tmp"), *(directory / EXPERTS_DIR).glob(".*.tmp")]:
                tmp.unlink(missing_ok=True)
                log.warning("removed %s, left by a write that did not finish", tmp)
            if _index_digest(directory) != index_sha256:  # changed since the load read it: its names are old
                return
            orphans = sorted(p.name for p in (directory / EXPERTS_DIR).glob("*.safetensors") if p.stem not in names)
            if orphans:
                log.warning("%s: expert files the index does not list (ignored): %s", directory / EXPERTS_DIR, ", ".join(orphans))
    except OSError as e:
        log.debug("repository %s not tidied: %s", directory, e)
