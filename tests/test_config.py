"""Every config file composes; every group option is reachable by name."""

import pytest
from conftest import read_metrics
from omegaconf import OmegaConf

from fedtune.config import CONF_DIR, compose_config, validate

GROUP_OPTIONS = sorted(
    (p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml")
)


def test_every_yaml_is_valid_yaml():
    for path in CONF_DIR.rglob("*.yaml"):
        assert OmegaConf.load(path) is not None, path


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "quant" and option != "none":
        overrides.append("lora.enabled=true")
    if group == "model" and OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml").get("generative", True) is False:
        overrides += ["data=banking77", "data.classify_with=head"]  # encoders only classify with a head
    cfg = compose_config(overrides)
    validate(cfg)
    if group != "experiment":
        assert cfg[group] is not None
    OmegaConf.to_container(cfg[group] if group != "experiment" else cfg, resolve=False)


def test_experiment_overlays_start_with_package_global():
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        assert path.read_text().splitlines()[0].strip() == "# @package _global_", path


def test_defaults():
    cfg = compose_config()
    assert cfg.num_clients == 3 and cfg.clients_per_round is None
    assert cfg.model.name == "tiny" and cfg.data.name == "synthetic" and cfg.lora.enabled
    assert cfg.logger.mode == "offline"


def test_comm_extreme_is_the_documented_setting_and_cuts_uplink_bytes(run_fedtune):
    """comm=extreme: the frontier's setting (docs/compression.md), and on the tiny model far fewer bytes up
    than the default (fp32 FedAvg) for the same rounds."""
    cfg = compose_config(["comm=extreme"])
    assert cfg.strategy._target_.endswith("GradualDiff") and cfg.strategy.weighting == "examples"
    assert (cfg.comm.up, cfg.comm.error_feedback, cfg.comm.wire, cfg.comm.entropy, cfg.lora.mode) == (
        "randk0.75+sign", True, "compact", "zstd", "lora")
    assert cfg.comm.down == "none" and cfg.comm.ladder == compose_config([]).comm.ladder  # the rest: comm/default
    validate(cfg)
    _, base = run_fedtune("lora.modules_to_save=[]")
    _, extreme = run_fedtune("comm=extreme", "lora.modules_to_save=[]")
    up = [sum(r["comm/up_bytes"] for r in read_metrics(out)) for out in (base, extreme)]
    # 32 bits a value vs 1 for 3 values in 4 (+ a bf16 scale per 256 values, the name table once): > 25x fewer
    # (it would be ~30x with every value sent, 2x with none compressed and half of them dropped)
    assert up[0] > 25 * up[1], up
