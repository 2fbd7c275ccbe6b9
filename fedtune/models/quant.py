"""4/8-bit base weights (bitsandbytes) and what the frozen base costs in memory.

``quant`` is the ``quant`` config node as a dict (``None`` for ``quant=none``): ``load_in`` is
``null``, ``8bit`` or ``4bit``; 4-bit adds ``quant_type`` (nf4 | fp4), ``double_quant`` and
``compute_dtype``; 8-bit may set ``int8_threshold``. Only ``nn.Linear``-like layers are quantized;
embeddings, norms, the LM head and a new classification head (the last module) stay full precision,
so they can still be trained.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeGuard

import torch
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from fedtune.errors import ConfigError

# bitsandbytes on CPU: a notice per 8-bit matmul that fp32 inputs are cast, and one per 4-bit layer
# when inputs and compute dtype differ. Neither says anything about the run.
warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
warnings.filterwarnings("ignore", message=".*Input type into Linear4bit is.*")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

LOAD_IN = (None, "8bit", "4bit")


def is_quantized(quant: Mapping[str, Any] | None) -> TypeGuard[Mapping[str, Any]]:
    """Whether ``quant`` asks for quantized base weights (``None`` / ``load_in: null`` do not)."""
    return quant is not None and quant.get("load_in") is not None


def bnb_config(quant: Mapping[str, Any] | None) -> Any:
    """A ``BitsAndBytesConfig`` for ``quant``, or ``None`` for full-precision weights."""
    if not is_quantized(quant):
        return None
    assert quant is not None
    name, load_in = quant.get("name", "?"), quant.get("load_in")
    if load_in not in LOAD_IN:
        raise ConfigError(f"quant.load_in={load_in}: must be null, 8bit or 4bit (e.g. quant=nf4 or quant=int8)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"quant={name} needs bitsandbytes: pip install 'fedtune[quant]' (or quant=none)"
        ) from None
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(quant.get("int8_threshold", 6.0)))
    quant_type = quant.get("quant_type", "nf4")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant.quant_type={quant_type}: must be nf4 or fp4")
    compute_dtype = str(quant.get("compute_dtype", "float32"))
    if not isinstance(getattr(torch, compute_dtype, None), torch.dtype):
        raise ConfigError(f"quant.compute_dtype={compute_dtype}: must be a torch dtype (float32, bfloat16, float16)")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", False)),
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load/save reports inside the block (restored after)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def quantize_built(model: PreTrainedModel, quant: Mapping[str, Any] | None) -> PreTrainedModel:
    """Quantize a model built from config (random init) the way ``from_pretrained`` would.

    bitsandbytes quantizes while loading a checkpoint, so the built weights make a round trip
    through a temporary folder: the quantized model starts from exactly those weights.
    """
    config = bnb_config(quant)
    if config is None:
        return model
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="fedtune-quant-") as folder, quiet_transformers():
        model.save_pretrained(folder)
        return type(model).from_pretrained(folder, quantization_config=config, dtype=dtype)


def _quant_stats_bytes(param: torch.Tensor) -> int:
    """Bytes of a quantized weight's scales, which live beside ``param`` rather than in it."""
    scb = getattr(param, "SCB", None)  # int8: one fp32 scale per row
    if isinstance(scb, torch.Tensor):
        return scb.nbytes
    state = getattr(param, "quant_state", None)  # 4-bit: blockwise absmax (itself quantized if nested)
    if state is None:
        return 0
    total = state.absmax.nbytes
    if getattr(state, "nested", False):
        total += state.state2.absmax.nbytes + 4  # + the fp32 offset
    return total


def base_bytes(model: torch.nn.Module) -> int:
    """Memory held by the base model's weights (quantized storage and scales included).

    Counts every parameter except the adapter's own (LoRA matrices and the trainable copies of
    ``modules_to_save``), so it is the same before and after ``apply_lora`` and with
    ``lora.enabled=false``; tied weights are counted once, buffers (rotary tables) not at all.
    """
    total = 0
    for name, param in model.named_parameters():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        total += param.nbytes + _quant_stats_bytes(param)
    return total
