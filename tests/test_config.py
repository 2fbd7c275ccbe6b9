"""Every config file composes; every group option is reachable by name."""

import pytest
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
