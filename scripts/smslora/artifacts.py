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


def verify_checksums(folder: Path) -> None:
    """Weights written by this project must be the bytes it wrote: a truncated copy, a disk
    error or a hand edit is caught here, by name, instead of loading wrong numbers."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return  # a folder from elsewhere (e.g. a Hub model): nothing recorded to check
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        step, files = recorded["written_by"], dict(recorded["files"])
    except (ValueError, OSError, KeyError, TypeError):
        raise UserError(f"{path} is unreadable: re-run the step that wrote {Path(folder).name}")
    bad = []
    for name, want in files.items():
        f = Path(folder) / name
        if not f.is_file():
            bad.append(f"{name} missing")
        elif f.stat().st_size != want["bytes"]:
            bad.append(f"{name} has {f.stat().st_size} bytes, not {want['bytes']}")
        elif sha256(f) != want["sha256"]:
            bad.append(f"{name} does not match its SHA-256")
    if bad:
        raise UserError(f"{folder} is damaged ({'; '.join(bad)}): re-run {step}")


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
