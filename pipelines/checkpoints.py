"""Checkpoints of one run, registered atomically, on a local folder or a bucket.

A checkpoint is a folder ``stage-NN-step-SSSSSS`` under the run's own root
(``<storage>/checkpoints/<run key>``: a new run never sees another run's
state). Its files are written first and a ``_COMPLETE`` marker last, holding
every file's size; a folder without a valid marker is ignored, never
half-used. The trainer writes and finds checkpoints itself, so a restarted
worker group (Ray Train's ``FailureConfig``) or a resumed driver continues
from the newest complete one whichever process wrote it, on either backend.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.files import content_hash, writing

MARKER = "_COMPLETE"


class CheckpointWarning(UserWarning):
    """A checkpoint whose content differs from its marker: not used; the run falls back to an earlier one."""


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A complete checkpoint: where the stream stood when it was written."""

    stage: int
    step: int
    done: bool  # the stage's final state (after its end-of-task merges and strategy hooks)
    name: str

    @property
    def position(self) -> tuple[int, int]:
        """Order of checkpoints within a run: a stage's final state comes after all its steps."""
        return (self.stage, 1 << 40) if self.done else (self.stage, self.step)


def checkpoint_name(stage: int, step: int, done: bool) -> str:
    return f"stage-{stage:02d}-{'final' if done else f'step-{step:06d}'}"


def _parse(name: str) -> tuple[int, int | None, bool] | None:
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "stage" and parts[2] == "final" and parts[1].isdigit():
        return int(parts[1]), None, True
    if len(parts) == 4 and parts[0] == "stage" and parts[2] == "step" and parts[1].isdigit() and parts[3].isdigit():
        return int(parts[1]), int(parts[3]), False
    return None


class CheckpointStore:
    """The checkpoints of one run under ``root`` (a local path or a pyarrow-supported URI)."""

    def __init__(self, root: str, keep_mid_stage: int = 2) -> None:
        self.root = root.rstrip("/")
        self.keep_mid_stage = keep_mid_stage
        if "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        self.fs.create_dir(self.base, recursive=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def save(self, folder: Path, stage: int, step: int, done: bool) -> CheckpointRef:
        """Upload ``folder`` (its files, flat) and register it: the one-writer case of the three steps below."""
        name = checkpoint_name(stage, step, done)
        self.clear_parts(name)
        self.put_parts(folder, name)
        return self.commit(name, stage, step, done)

    def _staging(self, name: str) -> str:
        # local: written beside, then renamed into place; buckets have no rename, the marker registers it
        return self._path(f".{name}.parts") if self._local else self._path(name)

    def clear_parts(self, name: str) -> None:
        """Start a checkpoint afresh (a killed writer may have left parts of it)."""
        staging = self._staging(name)
        self.fs.delete_dir_contents(staging, missing_dir_ok=True)
        self.fs.create_dir(staging, recursive=True)

    def put_parts(self, folder: Path, name: str) -> None:
        """Upload one writer's files (ranks write their own strategy state) into an unregistered checkpoint."""
        staging = self._staging(name)
        for path in sorted(folder.iterdir()):
            if path.is_file():
                with writing(f"{staging}/{path.name}"):
                    pafs.copy_files(str(path), f"{staging}/{path.name}", destination_filesystem=self.fs)

    def commit(self, name: str, stage: int, step: int, done: bool) -> CheckpointRef:
        """Write the marker over what was uploaded (each file's size and content hash, as stored) and make the
        checkpoint visible."""
        staging = self._staging(name)
        files = {i.base_name: {"size": i.size, "xxh3_128": content_hash(self.fs, i.path)}
                 for i in self.fs.get_file_info(pafs.FileSelector(staging))
                 if i.type == pafs.FileType.File and i.base_name != MARKER}
        with writing(f"{staging}/{MARKER}"), self.fs.open_output_stream(f"{staging}/{MARKER}") as out:
            out.write(json.dumps({"files": files, "stage": stage, "step": step, "done": done}).encode())
        if self._local:
            target = Path(self._path(name))
            if target.exists():
                shutil.rmtree(target)
            Path(staging).rename(target)  # atomic on one filesystem: the checkpoint appears whole
        self._prune(stage)
        return CheckpointRef(stage, step, done, name)

    @property
    def _local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def list(self) -> list[CheckpointRef]:
        """Every complete checkpoint, oldest position first."""
        refs = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True)):
            parsed = _parse(info.base_name) if info.type == pafs.FileType.Directory else None
            if parsed and self._complete(info.base_name):
                stage, step, done = parsed
                refs.append(CheckpointRef(stage, step if step is not None else self._step(info.base_name),
                                          done, info.base_name))
        return sorted(refs, key=lambda r: r.position)

    def latest(self) -> CheckpointRef | None:
        """The newest checkpoint whose content matches its marker (a mismatching one is warned about and
        unregistered, and the one before it is tried)."""
        refs = self.list()
        while refs:
            ref = refs.pop()
            problem = self.problem(ref)
            if problem is None:
                return ref
            self._reject(ref, problem, f"resuming from {refs[-1].name}" if refs else "starting the stream afresh")
        return None

    def final(self, stage: int) -> CheckpointRef | None:
        """Stage ``stage``'s final state, verified by content (None, with a warning, when it differs)."""
        ref = next((r for r in self.list() if r.stage == stage and r.done), None)
        problem = None if ref is None else self.problem(ref)
        if problem is None:
            return ref
        self._reject(ref, problem, f"stage {stage} is trained again from its start")
        return None

    def problem(self, ref: CheckpointRef) -> str | None:
        """Why a checkpoint's files differ from its marker, naming the file; None when every hash matches."""
        marker = self._marker(ref.name) or {}
        for file, entry in sorted(marker.get("files", {}).items()):
            path = self._path(ref.name, file)
            try:
                digest = content_hash(self.fs, path)
            except OSError as error:
                return f"{path}: unreadable ({error})"
            if digest != entry.get("xxh3_128"):
                return f"{path}: content differs from the hash in its {MARKER} marker"
        return None if marker.get("files") else f"{self._path(ref.name, MARKER)}: lists no files"

    def _reject(self, ref: CheckpointRef, problem: str, fallback: str) -> None:
        """Unregister a checkpoint that cannot be trusted (its files stay for inspection), with a warning."""
        warnings.warn(f"{problem}: checkpoint {ref.name} not used; {fallback}", CheckpointWarning, stacklevel=3)
        try:
            self.fs.delete_file(self._path(ref.name, MARKER))
        except FileNotFoundError:
            pass  # another rank or the driver unregistered it first

    def _marker(self, name: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self._path(name, MARKER)) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _complete(self, name: str) -> bool:
        """The marker exists and every file it lists has its recorded size (content: `problem`)."""
        marker = self._marker(name)
        if marker is None:
            return False
        sizes = {i.base_name: i.size for i in self.fs.get_file_info(pafs.FileSelector(self._path(name)))}
        return all(isinstance(entry, dict) and sizes.get(file) == entry.get("size")
                   for file, entry in marker["files"].items())

    def _step(self, name: str) -> int:
        return int((self._marker(name) or {}).get("step", 0))

    def download(self, ref: CheckpointRef, target: Path) -> Path:
        """Copy a checkpoint into ``target`` (replaced atomically); returns it."""
        target = Path(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent if target.parent.exists() else None))
        try:
            with writing(target):
                for file in self._marker(ref.name)["files"]:
                    pafs.copy_files(self._path(ref.name, file), str(tmp / file), source_filesystem=self.fs)
                if target.exists():
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(tmp), str(target))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _prune(self, stage: int) -> None:
        """Keep every stage's final state, and only the newest mid-stage checkpoints of the current stage."""
        refs = self.list()
        mid = [r for r in refs if not r.done and r.stage == stage]
        stale = [r for r in refs if not r.done and r.stage < stage] + mid[:-self.keep_mid_stage or None]
        if any(r.done and r.stage == stage for r in refs):
            stale = [r for r in refs if not r.done and r.stage <= stage]
        for ref in stale:
            self.fs.delete_dir(self._path(ref.name))
