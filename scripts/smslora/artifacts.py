"""Artifacts on disk: written under a temporary name and renamed into place (never half
written), checked by SHA-256 when read back (never silently different)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError, require
from .folder_checks import project_step, read_json, regular_file
from .paths import CHECKSUMS, SPLIT_MANIFEST


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make artifacts private
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_split(path: Path) -> list[dict]:
    """A split written by step 2, checked against the SHA-256 that split.json (written last)
    recorded for it: a step 2 that stopped half way cannot leave a mix of old and new splits
    that trains on test messages."""
    path = require(path, path.name, "scripts/02_prepare_data.py")
    manifest = path.parent / SPLIT_MANIFEST
    if manifest.is_file():
        try:
            want = json.loads(manifest.read_text(encoding="utf-8"))["sha256"].get(path.stem)
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"{manifest} is unreadable: re-run scripts/02_prepare_data.py")
        if want is not None and want != sha256(path):
            raise UserError(f"{path} is not the file split.json describes (step 2 was interrupted "
                            "or the files were mixed): re-run scripts/02_prepare_data.py")
    try:
        return read_jsonl(path)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged: re-run scripts/02_prepare_data.py")


def replace_dir(src: Path, dst: Path) -> None:
    """Put folder src in place of dst with renames only: at any moment dst is the old folder,
    nothing, or the new one, never a mix."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path, written_by: str) -> None:
    """Record the size and SHA-256 of every weights file in folder (checked when loading)."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.glob("*.safetensors"))}
    atomic_write_json(folder / CHECKSUMS, {"written_by": written_by, "files": files})


def recorded_checksums(folder: Path, fix: str) -> dict[str, dict] | None:
    """checksums.json's {file name: {"bytes", "sha256"}}, each name a file of folder itself."""
    path = Path(folder) / CHECKSUMS
    if not os.path.lexists(path):
        return None
    regular_file(path)
    try:
        files = dict(read_json(path)["files"])
    except (UserError, KeyError, TypeError, ValueError):
        raise UserError(f"{path} is unreadable: {fix}") from None
    for name, want in files.items():
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise UserError(f"{path} is damaged: {name!r} is not a file name in {folder}; {fix}")
        if not isinstance(want, dict) or type(want.get("bytes")) is not int or not isinstance(
                want.get("sha256"), str):
            raise UserError(f"{path} is damaged: no size and SHA-256 for {name}; {fix}")
    return files


def folder_fingerprint(folder: Path, config: str) -> dict:
    """A model or adapter folder as scores depend on it: the SHA-256 of its config and of its
    weights (those checksums.json records, which loading verified, else computed)."""
    folder = Path(folder)
    recorded = recorded_checksums(folder, f"re-create {folder}") or {}
    weights = {p.name: recorded[p.name]["sha256"] if p.name in recorded else sha256(p)
               for p in sorted(folder.glob("*.safetensors"))}
    return {"config": sha256(folder / config), "weights": weights}


def verify_checksums(folder: Path, remedy: str | None = None, missing_ok: bool = False) -> None:
    """Weights written by this project must be the bytes it wrote: a truncated copy, a disk
    error or a hand edit is caught here, by name, instead of loading wrong numbers.

    A folder this project wrote (folder_checks.project_step) must have its checksums.json, unless
    missing_ok; one from elsewhere (a Hub model) may have none. The remedy named is the project's
    own (`remedy`, else the step that writes such a folder), never text from the file."""
    folder = Path(folder)
    step = remedy or project_step(folder)
    fix = f"re-run {step}" if step else f"replace {folder} with a good copy"
    files = recorded_checksums(folder, fix)
    if files is None:
        if step is not None and not missing_ok:
            raise UserError(f"{folder / CHECKSUMS} is missing: {folder} was written by {step}, "
                            f"which records its weights' checksums there; {fix}")
        return
    bad = [f"{p.name} is not in {CHECKSUMS}" for p in sorted(folder.glob("*.safetensors"))
           if p.name not in files]
    for name, want in files.items():
        f = folder / name
        if not os.path.lexists(f):
            bad.append(f"{name} missing")
            continue
        size = regular_file(f).st_size
        if size != want["bytes"]:
            bad.append(f"{name} has {size} bytes, not {want['bytes']}")
        elif sha256(f) != want["sha256"]:
            bad.append(f"{name} does not match its SHA-256")
    if bad:
        raise UserError(f"{folder} is damaged ({'; '.join(bad)}): {fix}")


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` whole.

    A crash inside the block leaves the previous `path` (or nothing) and no partial folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the artifact private
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
