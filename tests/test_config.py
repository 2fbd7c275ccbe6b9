"""Every config file composes; every group option is reachable by name."""

import pytest
from conftest import read_metrics
from omegaconf import OmegaConf

from fedtune.config import CONF_DIR, compose_config, validate
from fedtune.errors import ConfigError

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
    assert (cfg.comm.up, cfg.comm.error_feedback, cfg.comm.wire, cfg.comm.entropy, cfg.lora.mode, cfg.lora.alpha) == (
        "tern", True, "compact", "zstd", "ffa", 32)
    assert cfg.comm.down == "none" and cfg.comm.ladder == compose_config([]).comm.ladder  # the rest: comm/default
    validate(cfg)
    # FFA needs adapters: full-parameter training with the preset says which key to set
    with pytest.raises(ConfigError, match=r"lora.mode=ffa needs LoRA .*or lora.mode=lora: comm=extreme sets ffa"):
        validate(compose_config(["comm=extreme", "lora.enabled=false"]))
    validate(compose_config(["comm=extreme", "lora.enabled=false", "lora.mode=lora"]))
    _, base = run_fedtune("lora.modules_to_save=[]")
    _, extreme = run_fedtune("comm=extreme", "lora.modules_to_save=[]")
    up = [sum(r["comm/up_bytes"] for r in read_metrics(out)) for out in (base, extreme)]
    # B only (about half: tiny's fedavg with lora.mode=ffa sends 604,096 of 1,142,560 bytes up) at ~1.6 bits
    # a value (ternary, a bf16 scale per 256) against 32: ~37x, less the name table and tensors left in fp32 (35.7x
    # measured). A and B both ternary (lora.mode=lora) would be ~20x; B only in fp32, ~2x.
    assert up[0] > 30 * up[1], (up, up[0] / up[1])


def test_comm_extreme_run_resumed_after_two_of_four_rounds_logs_what_a_straight_run_does(tmp_path):
    """The preset's parts together across a restart: FFA's frozen A (re-made from the seed), the ternary code's
    error-feedback residuals, the compact wire's name tables and GradualDiff's server state."""
    from conftest import FAST

    from fedtune.run import run

    common = [*FAST, "comm=extreme", "lora.dropout=0", "checkpoint.keep_last=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_config([*common, "num_rounds=4"]), out_dir=straight)
    run(compose_config([*common, "num_rounds=2"]), out_dir=resumed)
    run(compose_config([*common, "num_rounds=4"]), out_dir=resumed, resume=True)

    def stable(out):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/process"))} for r in read_metrics(out)]

    want = stable(straight)
    assert len(want) == 4 and stable(resumed) == want
