"""lora.mode: which LoRA factors are trained and exchanged (ffa: B only; sb: an r x r R between frozen A, B)."""

import pytest
import torch
from omegaconf import OmegaConf

from fedtune.errors import ConfigError
from fedtune.models.build import tiny_llama
from fedtune.models.lora import (
    apply_lora,
    count_parameters,
    frozen_keys,
    get_frozen_state,
    get_trainable_state,
    sb_factorize,
    set_frozen_state,
    set_trainable_state,
    to_sb,
)
from fedtune.models.tokenizer import word_level

R = 4
LORA = OmegaConf.create({"enabled": True, "r": R, "alpha": 8, "dropout": 0.0, "target_modules": None,
                         "modules_to_save": None, "mode": "lora"})
IDS = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])


def _model(mode="lora", seed=0):
    torch.manual_seed(seed)
    tok = word_level(texts=["a b c d e f"])
    return apply_lora(tiny_llama(tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                      OmegaConf.merge(LORA, {"mode": mode}), default_targets=["q_proj", "v_proj"])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_trainable_state(model).items()}


def _train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()


def test_ffa_trains_and_exchanges_b_only_and_a_keeps_its_seeded_init():
    model = _model("ffa")
    state = get_trainable_state(model)
    assert state and all(".lora_B." in k for k in state), sorted(state)
    assert frozen_keys(model) == {k.replace("lora_B", "lora_A") for k in state}
    a_before = get_frozen_state(model)
    set_trainable_state(model, _random_state(model, 1))  # B = 0 at init: give A a gradient path
    _train(model)
    assert all(torch.equal(a_before[k], v) for k, v in get_frozen_state(model).items())  # A never moves
    assert not torch.equal(get_trainable_state(model)[next(iter(state))], _random_state(model, 1)[next(iter(state))])
    # every process builds the same A from the seed: a second build (another client's process) agrees
    assert all(torch.equal(a_before[k], v) for k, v in get_frozen_state(_model("ffa")).items())
    trainable, _ = count_parameters(model)
    assert trainable == sum(v.numel() for v in state.values())
    with pytest.raises(KeyError):  # A is not part of the trainable state
        set_trainable_state(model, {**state, **a_before})


def test_ffa_mean_of_b_is_the_mean_of_the_products():
    """(mean_i B_i) A == mean_i (B_i A): FedAvg over B alone is exact for the adapted weights."""
    model = _model("ffa")
    a = get_frozen_state(model)
    bs = [_random_state(model, s) for s in (1, 2, 3)]
    w = [0.2, 0.3, 0.5]
    for kb in bs[0]:
        ka = kb.replace("lora_B", "lora_A")
        mean_b = sum(wi * b[kb] for wi, b in zip(w, bs))
        assert torch.allclose(mean_b @ a[ka], sum(wi * (b[kb] @ a[ka]) for wi, b in zip(w, bs)), atol=1e-6)


def test_sb_switch_keeps_the_outputs_and_leaves_only_r_trainable():
    model = _model("sb")
    set_trainable_state(model, _random_state(model, 1))
    before, ab = _logits(model), get_trainable_state(model)
    to_sb(model)
    state = get_trainable_state(model)
    assert sorted(state) == sorted(k.replace(".lora_B.weight", ".lora_B.default.R.weight")
                                   for k in ab if k.endswith(".lora_B.weight"))
    assert all(v.shape == (R, R) and torch.equal(v, torch.eye(R)) for v in state.values())
    assert frozen_keys(model) == set(ab)
    assert all(torch.equal(ab[k], v) for k, v in get_frozen_state(model).items())  # A, B frozen as they were
    assert torch.equal(_logits(model), before)  # R = I
    assert count_parameters(model)[0] == len(state) * R * R
    _train(model)
    assert all(torch.equal(ab[k], v) for k, v in get_frozen_state(model).items())
    assert not torch.equal(get_trainable_state(model)[next(iter(state))], torch.eye(R))
    trained = get_trainable_state(model)
    to_sb(model)  # idempotent: a client converts its process's model once, keeping what R learned
    again = get_trainable_state(model)
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in again)


def test_sb_forward_is_b_r_a_and_the_mean_of_r_is_exact():
    """A second path: a plain LoRA model whose B is B R gives the SB model's outputs; and the mean of the
    adapted weights B R_i A over clients equals B (mean_i R_i) A."""
    sb, plain = _model("sb"), _model("lora")
    ab = _random_state(sb, 1)
    set_trainable_state(sb, ab)
    to_sb(sb)
    rs = [{k: torch.eye(R) + 0.2 * torch.randn(R, R, generator=torch.Generator().manual_seed(s))
           for k in get_trainable_state(sb)} for s in (2, 3)]
    mean_r = {k: (rs[0][k] + rs[1][k]) / 2 for k in rs[0]}
    set_trainable_state(sb, mean_r)
    folded = {}
    for k, v in ab.items():
        if k.endswith(".lora_B.weight"):
            rk = k.replace(".lora_B.weight", ".lora_B.default.R.weight")
            ka = k.replace("lora_B", "lora_A")
            folded[k] = v @ mean_r[rk]
            per_client = [(v @ r[rk]) @ ab[ka] for r in rs]
            assert torch.allclose(folded[k] @ ab[ka], (per_client[0] + per_client[1]) / 2, atol=1e-6)
        else:
            folded[k] = v
    set_trainable_state(plain, folded)
    assert torch.allclose(_logits(sb), _logits(plain), atol=1e-5)


def test_sb_factorize_gives_orthonormal_factors_and_the_singular_values():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 12, generator=g), 0.01 * torch.randn(10, 4, generator=g)  # B small, as after a round
    a2, b2, r = sb_factorize(a, b)
    assert (a2.shape, b2.shape, r.shape) == (a.shape, b.shape, (4, 4))
    assert torch.allclose(b2 @ r @ a2, b @ a, atol=1e-6)
    assert torch.allclose(b2.T @ b2, torch.eye(4), atol=1e-5) and torch.allclose(a2 @ a2.T, torch.eye(4), atol=1e-5)
    # R is diagonal with B A's singular values (from the full 10 x 12 matrix: a second path)
    assert torch.allclose(r, torch.diag(torch.linalg.svdvals(b @ a)[:4]), atol=1e-6)
    zero = sb_factorize(a, torch.zeros_like(b))  # B = 0 (no warm-up): R = 0, the factors still orthonormal
    assert torch.equal(zero[2], torch.zeros(4, 4)) and torch.allclose(zero[1].T @ zero[1], torch.eye(4), atol=1e-5)


def test_frozen_state_round_trips_and_checks_keys():
    model = _model("sb")
    to_sb(model)
    frozen = {k: torch.full_like(v, 0.5) for k, v in get_frozen_state(model).items()}
    set_frozen_state(model, frozen)
    assert all(torch.equal(v, frozen[k]) for k, v in get_frozen_state(model).items())
    with pytest.raises(KeyError):
        set_frozen_state(model, dict(list(frozen.items())[1:]))


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.mode=bogus"):
        _model("bogus")
