"""The client's quantized sub-LLM (QLoRA base): quantize, save, load, and swap layers in place.

In: a float HF checkpoint folder (the aligned sub-LLM) and a [quantize] spec section. Out: a folder
that `load_client_model` turns back into a model ready for LoRA training.

Design (bitsandbytes 0.50.2 on CPU, transformers 5.24), each choice checked on this machine:
- Quantize with transformers: `from_pretrained(float_dir, quantization_config=BitsAndBytesConfig,
  dtype=float32)` swaps every `nn.Linear` of the decoder layers for a bnb `Linear4bit` (NF4/FP4,
  blocksize 64, optional double quantization of the absmax constants) or `Linear8bitLt` and
  quantizes the float32 weights while loading. Linear modules outside the decoder layers (lm_head)
  are skipped; embeddings and norms are never quantized.
- Save with our own writer, not `save_pretrained`: transformers 5.24 cannot re-save a model that was
  loaded from a prequantized folder (NotImplementedError in revert_weight_conversion), and we want
  every non-quantized float tensor stored as bf16 while computing in float32. The tensors are
  exactly bnb's serialization (packed 4-bit data, absmax, quant_map, nested stats, quant_state
  blob; int8 data + SCB), tied embeddings once, so stock `from_pretrained` reads the folder.
- Load = `AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype)` under the hood (the
  config carries `quantization_config`), then peft's `prepare_model_for_kbit_training`.
- bnb's CPU fast path is switched off: on a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode
  without grad repacks the weight for a bf16 kernel (activations and absmax rounded to bf16, the
  double-quantized absmax replaced by a dequantized bf16 copy that a later save re-quantizes). With
  it off, inference and training run the same float32 path and a reload gives the same logits.
- `embeddings = "int8"`: embedding (and an untied lm_head) stored as int8 with one absmax scale per
  row in `embeddings.int8.safetensors`, left out of `model.safetensors`, dequantized on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from fedsoda_cli.artifacts import replace_folder
from fedsoda_cli.errors import ModelError
from fedsoda_cli.models.layers import unwrap
from fedsoda_cli.spec.schema import QuantizeSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS = "model.safetensors"
EMBEDDINGS_INT8 = "embeddings.int8.safetensors"
CLIENT_META = "client_model.json"
SCALE_SUFFIX = ".row_scale"
BLOCKSIZE = 64  # bnb's (and transformers') 4-bit block size


def _bnb():
    import logging

    # Importing bnb on a CPU with AVX512-BF16 logs a warning about an optional `kernels` package,
    # and its int8 matmul logs one on every call (float32 inputs are cast to float16).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


# ---- quantize ---------------------------------------------------------------------------------


def bnb_config(quant: QuantizeSpec, skip: list[str], compute_dtype: torch.dtype = torch.float32):
    """The BitsAndBytesConfig for `quant.quant_type` (None for "none"), skipping modules `skip`."""
    from transformers import BitsAndBytesConfig

    if quant.quant_type == "none":
        return None
    if quant.quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def quantize_checkpoint(
    float_dir: str | os.PathLike,
    quant: QuantizeSpec,
    *,
    compute_dtype: torch.dtype = torch.float32,
    bf16_layers: Sequence[int] = (),
):
    """Load the float checkpoint `float_dir` with its decoder layers' linear weights quantized to
    `quant.quant_type`, except the decoder layers `bf16_layers` (sub-LLM indices: partial layers
    the client keeps in bf16); every other float tensor is rounded to bf16 (what will be stored)
    and held in `compute_dtype`; with `quant.embeddings = "int8"` the embeddings are rounded
    through int8. Returns the model as `load_client_model` will give it back after
    `save_client_model` (the skipped layers are recorded in its quantization_config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _bnb()
    float_dir = Path(float_dir)
    config = AutoConfig.from_pretrained(float_dir)
    skip = linear_modules_outside_layers(config)
    if bf16_layers:
        skip += bf16_layer_patterns(_layers_path_of(config), bf16_layers)
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, dtype=torch.float32, device_map="cpu", quantization_config=bnb_config(quant, skip, compute_dtype)
    )
    _fp32_path(model)
    int8 = [w for _, w in embedding_weights(model)] if quant.embeddings == "int8" else []
    for param in _float_params(model):
        if any(param is w for w in int8):
            q, scale = int8_rows(param.data)  # from the float32 weights, not through bf16
            param.data = (q.float() * scale[:, None]).to(compute_dtype)
        else:
            param.data = param.data.to(torch.bfloat16).to(compute_dtype)
    model.fedsoda_quantize = quant.model_dump()  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    return model.eval()


def linear_modules_outside_layers(config) -> list[str]:
    """Names of the nn.Linear modules that are not inside the decoder layers (lm_head, ...): the
    ones bitsandbytes must leave alone. Found on a weightless (meta) copy of the architecture."""
    from transformers import AutoModelForCausalLM

    from fedsoda_cli.models.layers import decoder_layers_path

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    inside = decoder_layers_path(skeleton) + "."
    return [
        name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear) and not name.startswith(inside)
    ]


def _layers_path_of(config) -> str:
    from transformers import AutoModelForCausalLM

    from fedsoda_cli.models.layers import decoder_layers_path

    with torch.device("meta"):
        return decoder_layers_path(AutoModelForCausalLM.from_config(config))


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: (q int8 [rows, cols], scale float32 [rows]) with weight ~= q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    # Settle on a scale with fl(fl(127 s) / 127) == s: re-quantizing the dequantized rows (a save
    # after quantize_checkpoint) then gives back the same q and scale, so a reload is exact.
    for _ in range(2):
        scale = (scale * 127.0) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def embedding_weights(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(state-dict key, parameter) of the input embedding and, when not tied to it, the output
    embedding (lm_head)."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)  # a tied weight is stored under its first name
    found = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not found[0]:
        found.append(out.weight)
    return [(names[id(w)], w) for w in found]


# ---- save -------------------------------------------------------------------------------------


def save_client_model(model, tokenizer, out_dir: str | os.PathLike, *, embeddings: str | None = None) -> Path:
    """Write a client model (from `quantize_checkpoint` or `load_client_model`) to `out_dir`
    atomically: config.json (with its quantization_config), model.safetensors (quantized weights as
    bnb serializes them, other floats bf16, tied tensors once), the tokenizer, client_model.json and,
    with int8 embeddings, embeddings.int8.safetensors. Returns `out_dir`."""
    from safetensors.torch import save_file

    meta = dict(getattr(model, "fedsoda_quantize", {}) or {})
    embeddings = embeddings or meta.get("embeddings", "bf16")
    state = client_state_dict(model)
    int8 = {}
    if embeddings == "int8":
        for key, weight in embedding_weights(model):
            q, scale = int8_rows(weight.data)
            int8[key], int8[key + SCALE_SUFFIX] = q, scale
            state.pop(key)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        if int8:
            save_file(int8, tmp / EMBEDDINGS_INT8, metadata={"format": "pt"})
        config = model.config
        config.dtype = torch.bfloat16
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta.update(embeddings=embeddings, embedding_keys=sorted(k for k in int8 if not k.endswith(SCALE_SUFFIX)))
        (tmp / CLIENT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def client_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors to store: bnb's quantized serialization as is, every other float parameter in
    bf16, each tied parameter once (under its first name), all contiguous copies."""
    model = unwrap(model)
    _fp32_path(model)  # packed CPU weights would be unpacked lossily by the save hook
    owners: dict[int, str] = {}
    to_bf16: set[str] = set()
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            tied.add(name)
            continue
        owners[id(param)] = name
        if _is_plain_float(param):
            to_bf16.add(name)
    state = {}
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue
        tensor = tensor.detach()
        state[key] = (tensor.to(torch.bfloat16) if key in to_bf16 else tensor).contiguous().clone()
    return state


# ---- load -------------------------------------------------------------------------------------


def load_client_model(
    path: str | os.PathLike,
    compute_dtype: torch.dtype = torch.float32,
    *,
    prepare_for_training: bool = True,
    gradient_checkpointing: bool = False,
):
    """(model, tokenizer) of a client model folder written by `save_client_model`.

    Under the hood `AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype)`: quantized
    linears compute in `compute_dtype`, bf16-stored tensors are upcast to it, int8 embeddings are
    dequantized. With `prepare_for_training`, peft's `prepare_model_for_kbit_training` freezes the
    base and makes inputs require grad, so `peft.get_peft_model` can add LoRA directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _bnb()
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CLIENT_META).is_file():
        raise ModelError(f"client model {path}: no {WEIGHTS} or {CLIENT_META}; rerun `fedsoda quantize SPEC`")
    meta = json.loads((path / CLIENT_META).read_text())
    expected_missing = bool(meta.get("embedding_keys"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # int8 embeddings are "missing" from model.safetensors by design
    try:
        # with output_loading_info=True it returns (model, info); transformers types it as the model alone
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype, device_map="cpu", output_loading_info=True)
        model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", loaded)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelError(
            f"client model {path}: cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); rerun `fedsoda quantize SPEC`"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info.get("missing_keys", []))
    if expected_missing:
        # int8 embeddings are absent from model.safetensors, and so is every name tied to them.
        embedding_ids = {id(w) for _, w in embedding_weights(model)}
        missing = {k for k in missing if id(_parameter(model, k)) not in embedding_ids}
    if missing:
        raise ModelError(
            f"client model {path}: {len(missing)} weights missing (e.g. {sorted(missing)[0]}); rerun `fedsoda quantize SPEC`"
        )
    if expected_missing:
        _load_int8_embeddings(model, path / EMBEDDINGS_INT8, compute_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _fp32_path(model)
    # transformers keeps the stored bf16 for a bnb-quantized checkpoint whatever `dtype` says.
    for param in _float_params(model):
        param.data = param.data.to(compute_dtype)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # a bnb Linear4bit
            module.compute_dtype = compute_dtype  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    model.fedsoda_quantize = {k: v for k, v in meta.items() if k != "embedding_keys"}  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    if prepare_for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model.eval(), tokenizer


def _load_int8_embeddings(model, file: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    if not file.is_file():
        raise ModelError(f"client model {file.parent}: {file.name} is missing; rerun `fedsoda quantize SPEC`")
    tensors = load_file(file)
    for key, weight in embedding_weights(model):
        if key not in tensors:
            raise ModelError(f"client model {file.parent}: {file.name} has no {key}; rerun `fedsoda quantize SPEC`")
        with torch.no_grad():
            weight.data = (tensors[key].float() * tensors[key + SCALE_SUFFIX][:, None]).to(dtype)


# ---- bytes and layer swaps --------------------------------------------------------------------


def folder_bytes(path: str | os.PathLike) -> int:
    """Total bytes of the files under `path` (what a client keeps on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_file_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (*.safetensors) under `path`."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def quantize_linear_weight(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict[str, torch.Tensor]:
    """One linear weight serialized as the client checkpoint stores it, keys relative to the linear
    module: "weight" plus "weight.absmax", "weight.quant_map", ... (4-bit), "SCB" and
    "weight_format" (int8), or just "weight" in bf16 ("none"). Same bnb calls as transformers'
    loader, so the tensors equal those of a full re-quantization."""
    bnb = _bnb()
    w = weight.detach().to(torch.float32).contiguous()
    if quant_type in ("nf4", "fp4"):
        p = bnb.nn.Params4bit(
            w,
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=torch.uint8,
        ).to("cpu")
        out = {"weight": p.data.clone()}
        out.update({"weight." + k: v.detach().clone() for k, v in p.quant_state.as_dict(packed=True).items()})
        return out
    if quant_type == "int8":
        p = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")
        return {"weight": p.data.clone(), "SCB": p.SCB.clone(), "weight_format": torch.tensor(0, dtype=torch.uint8)}
    return {"weight": w.to(torch.bfloat16)}


def set_module_tensors(model, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Swap serialized tensors (keys as in the client checkpoint, e.g. from
    `quantize_linear_weight` or a realign artifact) into `model` in place: quantized linears get new
    quantized weights, other parameters are copied in their current dtype. Works through peft
    wrappers (LoRA layers keep their adapter). Returns the module paths it touched."""
    bnb = _bnb()
    base = unwrap(model)
    modules = dict(base.named_modules())
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_name, attr = _split_key(key, modules)
        groups.setdefault(module_name, {})[attr] = value
    for module_name, parts in groups.items():
        module = modules[module_name]
        module = getattr(module, "base_layer", module)  # a peft LoRA wrapper around the linear
        if isinstance(module, bnb.nn.Linear4bit) and "weight" in parts:
            stats = {k[len("weight.") :]: v for k, v in parts.items() if k.startswith("weight.")}
            module.weight = bnb.nn.Params4bit.from_prequantized(parts["weight"], stats, device="cpu", module=module)
            module.support_avx512bf16_for_cpu = False
            parts = {k: v for k, v in parts.items() if k != "weight" and not k.startswith("weight.")}
        elif isinstance(module, bnb.nn.Linear8bitLt) and "weight" in parts:
            with torch.no_grad():
                module.weight.data.copy_(parts.pop("weight"))
                scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
                scb.copy_(parts.pop("SCB"))
            parts.pop("weight_format", None)
        for attr, value in parts.items():
            target = getattr(module, attr)
            with torch.no_grad():
                target.data.copy_(value.to(target.dtype))
    return sorted(groups)


def _split_key(key: str, modules: dict) -> tuple[str, str]:
    """("model.layers.3.self_attn.q_proj", "weight.absmax") for a checkpoint key: the longest
    module path that prefixes it."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        if name in modules:
            return name, ".".join(parts[cut:])
    raise ModelError(f"tensor {key!r} does not belong to any module of the client model; the artifact was made for another model")


# ---- helpers ----------------------------------------------------------------------------------


def bf16_layer_patterns(layers_path: str, layers: Iterable[int]) -> list[str]:
    """bitsandbytes skip patterns for decoder layers kept in bf16 on the client ("model.layers.7"
    matches that layer's modules only, not layer 70's: transformers matches at module boundaries)."""
    return [f"{layers_path}.{k}" for k in sorted(set(layers))]


def _fp32_path(model) -> None:
    """Switch off bnb's bf16-packed CPU inference path on every 4-bit linear (see module doc),
    undoing the packing where a forward pass already applied it."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            weight = getattr(module, "weight", None)
            if weight is not None and getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def _parameter(model, key: str):
    try:
        return model.get_parameter(key)
    except AttributeError:
        return None


def _is_plain_float(param: torch.Tensor) -> bool:
    return param.is_floating_point() and type(param).__name__ not in ("Params4bit", "Int8Params")


def _float_params(model):
    seen = set()
    for param in model.parameters():
        if id(param) not in seen and _is_plain_float(param):
            seen.add(id(param))
            yield param
