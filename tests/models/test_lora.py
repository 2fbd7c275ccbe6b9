"""Trainable state get/set: copies, round trips, key checks."""

import pytest
import torch
from omegaconf import OmegaConf

from fedtune.models.build import tiny_llama
from fedtune.models.lora import apply_lora, count_parameters, get_trainable_state, set_trainable_state
from fedtune.models.tokenizer import word_level

LORA = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None,
                         "modules_to_save": None})


def _model(lora=LORA):
    torch.manual_seed(0)
    tok = word_level(texts=["a b c d e f"])
    return apply_lora(tiny_llama(tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                      lora, default_targets=["q_proj", "v_proj"])


def test_lora_state_is_a_copy_and_round_trips():
    model = _model()
    state = get_trainable_state(model)
    assert state and all("lora_" in k for k in state)
    live = dict(model.named_parameters())
    key = next(k for k in live if "lora_B" in k)
    state_key = next(k for k in state if "lora_B" in k)
    assert state[state_key].data_ptr() != live[key].data_ptr()  # peft aliases; we clone
    new = {k: torch.full_like(v, 0.5) for k, v in state.items()}
    set_trainable_state(model, new)
    assert all(torch.equal(v, new[k]) for k, v in get_trainable_state(model).items())
    new[state_key] += 1  # mutating the sent dict later must not reach the model
    assert not torch.equal(get_trainable_state(model)[state_key], new[state_key])


def test_unexpected_and_missing_keys_raise():
    model = _model()
    state = get_trainable_state(model)
    with pytest.raises(KeyError, match="does not"):
        set_trainable_state(model, {**state, "base_model.model.nonsense.lora_A.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks"):
        set_trainable_state(model, dict(list(state.items())[1:]))


def test_full_parameter_mode_exchanges_every_parameter():
    model = _model(OmegaConf.merge(LORA, {"enabled": False}))
    trainable, total = count_parameters(model)
    assert trainable == total
    state = get_trainable_state(model)
    assert sum(v.numel() for v in state.values()) == total
    with pytest.raises(KeyError):
        set_trainable_state(model, dict(list(state.items())[1:]))


def test_lora_counts_follow_rank():
    a = sum(v.numel() for v in get_trainable_state(_model()).values())
    b = sum(v.numel() for v in get_trainable_state(_model(OmegaConf.merge(LORA, {"r": 8}))).values())
    # q_proj, v_proj in 2 layers, hidden 32: r * (32 + 32) each -> 4 modules x r x 64
    assert (a, b) == (4 * 4 * 64, 4 * 8 * 64)


def test_adapter_swap_copies_into_the_parameters_peft_would_load():
    """set/get go straight to the live adapter parameters (found once, by storage): the same tensors peft's
    own set_peft_model_state_dict / get_peft_model_state_dict read and write, with modules_to_save too."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    lora = OmegaConf.merge(LORA, {"modules_to_save": ["lm_head"]})
    ours, theirs = _model(lora), _model(lora)
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=g) for k, v in get_trainable_state(ours).items()}
    assert any("lm_head" in k for k in state)
    set_trainable_state(ours, state)
    set_peft_model_state_dict(theirs, state)  # the second path: peft's loader
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    peft_view = get_peft_model_state_dict(ours, save_embedding_layers=False)
    assert list(get_trainable_state(ours)) == list(peft_view)
    assert all(torch.equal(get_trainable_state(ours)[k], peft_view[k]) for k in peft_view)
