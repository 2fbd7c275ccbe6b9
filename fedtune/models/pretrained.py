"""Pretrained models and tokenizers: a local folder, the hub, or a model shipped in a Python package.

Where a model comes from, first match wins (:func:`resolve`):

1. ``model.name_or_path`` names an existing folder -> that folder (``local_files_only``).
2. ``model.name_or_path`` is a hub id, already in the hub cache or with the hub reachable -> the hub
   (``local_files_only`` when ``HF_HUB_OFFLINE`` is set or the hub is unreachable).
3. ``model.packaged`` names an installed package (``pip install 'fedtune[offline-models]'``) ->
   its model folder, or its GGUF file converted once to an fp32 safetensors folder under
   ``$FEDTUNE_CACHE/models/<name>`` (default ``~/.cache/fedtune``), so later runs load fast.
4. Otherwise: one-line :class:`ConfigError` naming ``model.name_or_path`` and the fix.

Builders keep the signatures of :mod:`fedtune.models.build`: ``tokenizer(texts=...)`` and
``causal_lm(tokenizer=, quant=, num_labels=)``; ``num_labels`` swaps the LM head for a new,
randomly initialised classification head.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.errors import ConfigError
from fedtune.models.quant import bnb_config, is_quantized, quiet_transformers

log = logging.getLogger(__name__)

KEY = "model.name_or_path"
# New classification heads are missing from any LM checkpoint by design; other missing keys are news.
HEAD_PREFIXES = ("score.", "classifier.")


@dataclass(frozen=True)
class Source:
    """What ``from_pretrained`` is given: a folder or hub id, and whether it may touch the network."""

    path: str
    local_files_only: bool
    origin: str  # folder | hub | packaged | gguf-cache


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now rather than at import."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_reachable() -> bool:
    """Not offline, and the hub endpoint answers (probed once per process)."""
    return not offline() and _probe_hub()


@functools.cache
def _probe_hub(timeout_s: float = 3.0) -> bool:
    """One HEAD request to the hub endpoint (proxies honoured).

    Without it an unreachable hub costs ~25 s of retries inside ``from_pretrained`` per file.
    """
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # the hub answered, if unhappily
    except (OSError, ValueError):
        return False
    return True


def cache_dir(name: str) -> Path:
    """Where a converted model lives: ``$FEDTUNE_CACHE/models/<name>`` (default ``~/.cache/fedtune``)."""
    root = os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune"
    return Path(root).expanduser() / "models" / name


def _package_dir(package: str) -> Path | None:
    """The installed package's folder, found without importing it (its imports may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _fix(packaged: Mapping[str, Any] | None) -> str:
    extra = " (or pip install 'fedtune[offline-models]')" if packaged else ""
    return f"pass {KEY}=<local folder>, or model=tiny{extra}"


def resolve(name_or_path: str | None, *, name: str, packaged: Mapping[str, Any] | None = None) -> Source:
    """Where to load ``name_or_path`` from (see the module docstring for the order)."""
    if name_or_path:
        folder = Path(str(name_or_path)).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{KEY}={name_or_path}: folder has no config.json (not a transformers model); "
                                  f"{_fix(None)}")
            return Source(str(folder), True, "folder")
        if str(name_or_path).startswith(("/", ".", "~")):
            raise ConfigError(f"{KEY}={name_or_path}: no such folder; {_fix(None)}")
        if _in_hub_cache(str(name_or_path)) or hub_reachable():
            return Source(str(name_or_path), offline() or not hub_reachable(), "hub")
    if packaged:
        source = _packaged(packaged, name=name)
        if source is not None:
            if name_or_path:
                _log_once(f"{KEY}={name_or_path}: {'HF_HUB_OFFLINE is set' if offline() else 'hub unreachable'}; "
                          f"using the copy packaged in {packaged['package']} ({source.path})")
            return source
    where = "HF_HUB_OFFLINE is set" if offline() else "the hub is unreachable"
    raise ConfigError(f"{KEY}={name_or_path}: not a local folder and {where}; {_fix(packaged)}")


def check_source(name_or_path: str | None, *, name: str, packaged: Mapping[str, Any] | None = None) -> None:
    """:func:`resolve`'s ConfigErrors without loading or converting anything (the CLI's pre-check of
    every sweep job): a local folder must hold a model; otherwise the hub (cached or reachable) or the
    packaged copy must be there."""
    if name_or_path:
        folder = Path(str(name_or_path)).expanduser()
        if folder.is_dir() or str(name_or_path).startswith(("/", ".", "~")):
            resolve(name_or_path, name=name)  # a local folder: checked, nothing loaded
            return
        if _in_hub_cache(str(name_or_path)) or hub_reachable():
            return
    if packaged and _package_dir(str(packaged["package"])) is not None:
        return
    where = "HF_HUB_OFFLINE is set" if offline() else "the hub is unreachable"
    raise ConfigError(f"{KEY}={name_or_path}: not a local folder and {where}; {_fix(packaged)}")


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def _packaged(packaged: Mapping[str, Any], *, name: str) -> Source | None:
    """The model shipped in ``packaged.package``: its ``folder``, or its ``gguf`` file converted once."""
    root = _package_dir(str(packaged["package"]))
    if root is None:
        return None
    if packaged.get("gguf"):
        return Source(str(gguf_folder(root / str(packaged["gguf"]), name=name, package=str(packaged["package"]))),
                      True, "gguf-cache")
    folder = root / str(packaged.get("folder", ""))
    assert (folder / "config.json").is_file(), f"{packaged} has no config.json"
    return Source(str(folder), True, "packaged")


def gguf_folder(gguf_path: Path, *, name: str, package: str = "") -> Path:
    """An fp32 safetensors folder (model + tokenizer) converted from ``gguf_path``, built once.

    A stamp file (gguf name, size, package version) written last marks a complete folder; a
    changed GGUF or an interrupted conversion rebuilds it.
    """
    target = cache_dir(name)
    stamp = {
        "gguf": gguf_path.name,
        "bytes": gguf_path.stat().st_size,
        "package": f"{package}=={importlib.metadata.version(package)}" if package else "",
    }
    if _stamp_matches(target, stamp):
        return target
    log.info("converting %s to fp32 safetensors in %s (once; later runs load that folder)", gguf_path.name, target)
    model, tokenizer = _convert_gguf(gguf_path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "fedtune_stamp.json").write_text(json.dumps(stamp, indent=2))
    except OSError as err:
        raise ConfigError(f"FEDTUNE_CACHE={target.parent.parent}: cannot write the converted model there "
                          f"({err.strerror or err}); set FEDTUNE_CACHE to a writable folder") from None
    if not _stamp_matches(target, stamp):  # else another process finished first: keep its folder
        shutil.rmtree(target, ignore_errors=True)  # a stale or half-written one
        try:
            tmp.rename(target)
        except OSError:
            if not _stamp_matches(target, stamp):
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stamp_matches(folder: Path, stamp: dict[str, Any]) -> bool:
    path = folder / "fedtune_stamp.json"
    return path.is_file() and json.loads(path.read_text()) == stamp


def _convert_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF checkpoint to fp32 with transformers (needs the ``gguf`` package)."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{gguf_path.name}: reading GGUF needs the gguf package: "
                          "pip install 'fedtune[offline-models]'")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain fp32 now: saved with the GGUF marker, a reload would look for the GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers sets hf_quantizer at load, undeclared; nn.Module types such attributes Tensor | Module
    model.hf_quantizer = None  # type: ignore[assignment]
    return model, tokenizer


def set_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without one a pad token (its EOS): batching and classification heads need it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{KEY}: tokenizer has neither a pad nor an EOS token; use another model")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_error(name_or_path: str | None, err: Exception) -> ConfigError:
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return ConfigError(f"{KEY}={name_or_path}: {first} ({_fix(None)})")


def tokenizer(
    *,
    name_or_path: str | None,
    name: str,
    packaged: Mapping[str, Any] | None = None,
    texts: Iterable[str] | None = None,
) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, with a pad token. ``texts`` is ignored (the vocabulary is fixed)."""
    del texts
    source = resolve(name_or_path, name=name, packaged=packaged)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(source.path, local_files_only=source.local_files_only)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from None
    return set_pad_token(tok)


def causal_lm(
    *,
    tokenizer: PreTrainedTokenizerBase,
    name_or_path: str | None,
    name: str,
    packaged: Mapping[str, Any] | None = None,
    quant: Mapping[str, Any] | None = None,
    num_labels: int | None = None,
    dtype: str = "float32",
) -> PreTrainedModel:
    """A pretrained causal LM; with ``num_labels``, the same body under a new classification head."""
    source = resolve(name_or_path, name=name, packaged=packaged)
    cls = AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM
    return _load(cls, source, name_or_path, tokenizer=tokenizer, quant=quant, num_labels=num_labels, dtype=dtype)


def encoder(
    *,
    tokenizer: PreTrainedTokenizerBase,
    name_or_path: str | None,
    name: str,
    packaged: Mapping[str, Any] | None = None,
    quant: Mapping[str, Any] | None = None,
    num_labels: int | None = None,
    dtype: str = "float32",
) -> PreTrainedModel:
    """A pretrained encoder (BERT-like) under a new sequence-classification head; it cannot generate."""
    if not num_labels:
        raise ConfigError(f"model={name} is an encoder (no language-model head) and cannot generate: "
                          "use it for classification with data.classify_with=head, or pick a causal LM")
    source = resolve(name_or_path, name=name, packaged=packaged)
    return _load(AutoModelForSequenceClassification, source, name_or_path, tokenizer=tokenizer, quant=quant,
                 num_labels=num_labels, dtype=dtype)


def _load(
    cls: Any,
    source: Source,
    name_or_path: str | None,
    *,
    tokenizer: PreTrainedTokenizerBase,
    quant: Mapping[str, Any] | None,
    num_labels: int | None,
    dtype: str,
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"num_labels": num_labels} if num_labels else {}
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                source.path, local_files_only=source.local_files_only, dtype=getattr(torch, dtype),
                quantization_config=bnb_config(quant), output_loading_info=True, **kwargs,
            )
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise _load_error(name_or_path, err) from None
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(HEAD_PREFIXES)]
    if missing:
        log.warning("%s: %d weights missing from the checkpoint, randomly initialised: %s",
                    source.path, len(missing), sorted(missing)[:5])
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("loaded %s (%s)%s", source.path, source.origin, f", quant={quant.get('name')}" if is_quantized(quant) else "")
    return model
