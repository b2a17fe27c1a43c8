"""A user mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; the message says what and which step to run."""


def require(path: Path, what: str, step: str) -> Path:
    """path, or a UserError naming the step that makes it."""
    if not Path(path).exists():
        raise UserError(f"{what} not found at {path}: run {step} first")
    return Path(path)


def require_model(model_dir: Path, adapter_path: Path | None = None) -> None:
    """Name the earliest missing step before any slow work (steps 1 and 3 come before the data)."""
    require(Path(model_dir) / "config.json", "the model's config.json",
            "scripts/01_download_model.py")
    if adapter_path is not None:
        require(Path(adapter_path) / "adapter_config.json", "adapter_config.json",
                "scripts/03_train.py")


def cli(main):
    """Wrap a command line's main(): UserError -> one line + exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except OSError as e:  # a read-only folder, a full disk, a vanished file...
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)

    return wrapper
