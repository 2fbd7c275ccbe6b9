"""Faults: one line and a documented exit code, nothing lost (corrupted checkpoints, Ctrl-C, bad knobs)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, read_metrics

from fedtune.config import compose_config
from fedtune.errors import ConfigError
from fedtune.run import run

VOLATILE = ("time/", "mem/process")


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(compose_config([*FAST, "num_rounds=4"]), out_dir=out)
    return read_metrics(out)


def _three_rounds(tmp_path):
    out = tmp_path / "run"
    run(compose_config([*FAST, "num_rounds=3", "checkpoint.keep_last=2"]), out_dir=out)
    return out


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pointer"])
def test_resume_falls_back_to_an_older_readable_checkpoint(tmp_path, reference, damage, caplog):
    out = _three_rounds(tmp_path)
    newest = out / "checkpoint" / "round_00002.pt"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:1000])
    elif damage == "garbage":
        newest.write_bytes(b"not a checkpoint at all")
    else:
        (out / "checkpoint" / "latest").write_text("{not json")
    with caplog.at_level("WARNING"):
        run(compose_config([*FAST, "num_rounds=4"]), out_dir=out, resume=True)
    assert _stable(read_metrics(out)) == _stable(reference)  # rounds after the older checkpoint re-run
    if damage != "pointer":
        assert any("round_00002.pt is unreadable" in m for m in caplog.messages)


def test_no_readable_checkpoint_is_one_line(tmp_path):
    out = _three_rounds(tmp_path)
    for f in (out / "checkpoint").glob("round_*.pt"):
        f.write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError, match="no readable checkpoint") as err:
        run(compose_config([*FAST, "num_rounds=4"]), out_dir=out, resume=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("override", "needle"), [
    ("threads=0", "threads=0: must be an integer >= 1"),
    ("threads=-1", "threads=-1: must be an integer >= 1"),
    ("threads=abc", "threads=abc: must be an integer >= 1"),
    ("comm.up=topk1.5", "comm.up=topk1.5: the topk fraction 1.5 must be in (0, 1]"),
    ("comm.down=randk0+int8", "comm.down=randk0+int8: the randk fraction 0 must be in (0, 1]"),
])
def test_bad_knobs_are_one_line(monkeypatch, tmp_path, capsys, override, needle):
    from fedtune import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedtune", "logger=none", override])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "outputs").exists()


def test_ctrl_c_is_one_line_exit_130_and_resumable(tmp_path, reference):
    out = tmp_path / "run"
    # 30 rounds: on a loaded machine the signal may land seconds after round 1's checkpoint is seen,
    # and the run must still be going then; the resume below stops at 4
    overrides = [*FAST, "num_rounds=30", "local.max_steps=40"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "fedtune", *overrides, f"output_dir={out}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # a shell's background job (`cmd &`, e.g. `make mutation-check &`) starts with
                            # SIGINT ignored, and children inherit that: give the run the default, as a terminal does
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:  # one round logged and checkpointed -> the second is running
        if (out / "checkpoint" / "latest").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].strip()
    assert proc.returncode == 130, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedtune: interrupted during round ") and f"resume={out}`" in err, err
    done = int(err.split("the last complete round is ")[1].split(" ")[0])
    assert done == len(read_metrics(out))
    run(compose_config([*overrides, "num_rounds=4"]), out_dir=out, resume=True)
    assert len(read_metrics(out)) == 4


def test_ctrl_c_while_old_checkpoints_are_pruned_still_offers_resume(tmp_path, monkeypatch):
    """Ctrl-C after ``latest`` points at the new checkpoint but before ``save`` returns (pruning): the
    checkpoint is complete, so the message offers resume from it, and resume works."""
    from fedtune import checkpoint
    from fedtune.errors import Interrupted

    real_save, calls = checkpoint.save, []

    def save_then_ctrl_c(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as exc:
        run(compose_config([*FAST, "num_rounds=4"]), out_dir=out)
    msg = str(exc.value)
    assert msg.startswith("interrupted during round 2/4; the last complete round is 2 (checkpointed)"), msg
    assert f"resume={out}" in msg
    monkeypatch.setattr(checkpoint, "save", real_save)
    run(compose_config([*FAST, "num_rounds=4"]), out_dir=out, resume=True)
    assert [r["round_idx"] for r in read_metrics(out)] == [0, 1, 2, 3]


def test_full_parameter_strategy_with_a_quantized_base_is_one_line():
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from fedtune.config import CONF_DIR, FULL_PARAMETER_STRATEGIES, validate

    for yaml in (CONF_DIR / "strategy").glob("*.yaml"):  # the list names exactly the full-parameter ones
        target = OmegaConf.load(yaml)._target_
        assert get_class(target).full_parameters == (target in FULL_PARAMETER_STRATEGIES), target
    with pytest.raises(ConfigError, match=r"quant=nf4: strategy FedCyBGD trains full parameters"):
        validate(compose_config(["strategy=fedcybgd", "quant=nf4"]))


def test_resume_honours_only_run_length_and_placement(monkeypatch, tmp_path, capsys):
    from fedtune import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["fedtune", *args])
        try:
            cli.main()
        except SystemExit as exc:
            return exc.code
        return 0

    assert main(*FAST, f"output_dir={out}") == 0
    capsys.readouterr()
    assert main(f"resume={out}", "lora.r=16") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedtune: error: lora.r: a resumed run keeps its own")
    assert main(f"resume={out}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing left to run (rounds done: 2 of num_rounds=2)" in err
    assert main(f"resume={out}", "num_rounds=3", "threads=1") == 0
    assert [r["round_idx"] for r in read_metrics(out)] == [0, 1, 2]
