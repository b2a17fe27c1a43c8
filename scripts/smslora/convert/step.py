"""Step 1 as one call: choose the source, convert or copy it into a fresh folder, check that
mlx-lm loads it, and only then put it in place."""

from __future__ import annotations

from pathlib import Path

from .. import bases
from ..artifacts import atomic_dir, verify_checksums, write_checksums
from ..errors import UserError
from ..model import check_remote_code
from ..paths import ROOT

WRITTEN_BY = "scripts/01_download_model.py"


def count_parameters(model_dir: Path) -> int:
    """Load the folder as mlx-lm does (strictly) and count its parameters (4-bit ones unpacked)."""
    from mlx_lm.utils import get_total_parameters, load_model

    try:
        model, _ = load_model(Path(model_dir), strict=True)
    except Exception as e:
        raise UserError(f"mlx-lm cannot load the result ({str(e).splitlines()[0][:200]}): "
                        "check the source model") from None
    return get_total_parameters(model)


def make_baseline(out: Path, base: str | None = None, gguf: Path | None = None,
                  hf_repo: str | None = None, dtype: str | None = None, force: bool = False,
                  trust_remote_code: bool = False) -> int:
    """Put a model in `out` from a registry base (default), a GGUF file, or an MLX folder/Hub
    repo. Every source is checked before anything is written. Returns the exit code."""
    from . import to_mlx
    from .. import hub

    out = Path(out).resolve()
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    if (out / "config.json").exists() and not force:
        held = bases.recorded_base(out)
        if base is None or held == base:
            print(f"{shown} already present (pass --force to re-create it)")
            return 0
        # another base asked for by name (runme.sh --base): the folder is step 1's to remake
        print(f"{shown} holds {held or 'a model from elsewhere'}: replacing it with base {base}")
    if hf_repo and dtype:
        raise UserError("--dtype applies to GGUF sources, not to --hf-repo (an MLX model as is)")
    # Check the source before atomic_dir creates anything (parent folders included).
    chosen = None
    if hf_repo:
        folder = hub.hf_snapshot(hf_repo)
        check_remote_code(folder, trust_remote_code)
        verify_checksums(folder)
    else:
        if gguf is None:
            chosen = bases.get(base or bases.DEFAULT_BASE)
            gguf = chosen.gguf()
            print(f"base {chosen.name}: {chosen.description}")
        checked = to_mlx.check_gguf(gguf)
    with atomic_dir(out) as tmp:
        if hf_repo:
            hub.fetch_hf(hf_repo, tmp, folder)
        else:
            to_mlx.convert_gguf(gguf, tmp, dtype or "auto", checked)
        write_checksums(tmp, WRITTEN_BY)
        n = count_parameters(tmp)  # inside: a folder mlx-lm cannot load is never put in place
    print(f"wrote {shown}: {n:,} parameters")
    chosen = chosen or (bases.base_of(gguf) if gguf is not None else None)
    if chosen is not None:
        print(chosen.licence_note())
    return 0
