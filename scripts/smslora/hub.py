"""`--hf-repo`: an MLX model folder from the Hugging Face Hub, or a local folder of one."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from . import folder_checks
from .artifacts import atomic_write_json
from .errors import UserError

HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]


def hf_snapshot(repo: str) -> Path:
    """A local folder with the MLX model: `repo` itself if it is a folder, else a Hub download."""
    folder = Path(repo).expanduser()
    looks_local = folder.exists() or repo.startswith(("/", ".", "~")) or repo.count("/") > 1
    if not folder.is_dir() and looks_local:
        raise UserError(f"{repo} is not a folder: pass a model folder or a Hub id like org/name")
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(repo_id=repo, allow_patterns=HF_PATTERNS))
        except Exception as e:  # offline, no such repo, invalid id, gated...
            raise UserError(f"cannot fetch {repo!r} from the Hugging Face Hub ({type(e).__name__})"
                            ": check the id and network, or pass a local folder") from None
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no config.json + *.safetensors: "
                        "point --hf-repo at an MLX model")
    folder_checks.check_model_files(folder, cache_root(folder))  # before any file is read
    folder_checks.check_model_contents(folder)
    return folder


def cache_root(folder: Path) -> Path:
    """Where a folder's links may point: the Hub's cache keeps a snapshot's files in
    ../../blobs; any other folder holds its own."""
    return folder.parents[1] if folder.parent.name == "snapshots" else folder


def fetch_hf(repo: str, out_dir: Path, folder: Path | None = None) -> None:
    """Copy an MLX model from the Hub (repo id) or a local folder into the existing out_dir."""
    folder = folder or hf_snapshot(repo)
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        wanted = any(fnmatch.fnmatch(f.name, p) for p in HF_PATTERNS)
        if f.is_file() and wanted and not rel.parts[0].startswith("."):  # skip .cache/ etc.
            folder_checks.regular_file(f, cache_root(folder))
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out_dir / rel)
    source = {"source": "hf", "repo": repo, "path": str(folder.resolve())}
    if (out_dir / "source.json").is_file():  # a copy of a converted folder: keep its history
        source["copied_source"] = folder_checks.read_json(out_dir / "source.json")
    atomic_write_json(out_dir / "source.json", source)
