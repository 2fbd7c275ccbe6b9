"""The CLI: bad input is one line on stderr, exit code 2, no traceback, nothing written."""

import json
import sys

import pytest
from conftest import FAST

from fedtune import cli


def _main(monkeypatch, tmp_path, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedtune", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code


BAD = [
    (["model=nope"], "model=nope"),
    (["foo=1"], "foo"),
    (["lora.r=0"], "lora.r=0"),
    (["num_clients=0"], "num_clients=0"),
    (["clients_per_round=5"], "clients_per_round=5"),
    (["local.lr=-0.1"], "local.lr=-0.1"),
    (["comm.up=zip"], "comm.up=zip"),
    (["-m", "strategy=split", "comm.activations=fp16,int9", *FAST, "num_rounds=1"], "comm.activations=int9"),
    (["-m", "lora.r=4,0"], "lora.r=0"),
    (["+clients.dropout=0.5"], "clients.dropout: no such config key, and nothing reads it"),
    (["-m", "model=smollm2-135m", "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct,/nonexistent/model"],
     "model.name_or_path=/nonexistent/model: no such folder"),
    (["+strategy.foo=1"], "strategy.foo: FedAvg has no setting foo"),
    (["-m", "schedule=sync,bogus"], "schedule=bogus"),
    (["strategy=kd", "schedule=async"], "schedule=async: strategy KD aggregates synchronously only"),
    (["schedule=semi_sync"], "schedule=semi_sync: set schedule.min_clients or schedule.deadline_s"),
    (["strategy.mode=async"], "strategy.mode"),
    (["-m", "partition=dirichlet", "partition.alpha=1,-1"], "partition.alpha"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2(monkeypatch, tmp_path, capsys, args, needle):
    code = _main(monkeypatch, tmp_path, *args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fedtune: error: ") and needle in err
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("metrics.jsonl"))


def test_more_clients_than_examples_is_one_line(monkeypatch, tmp_path, capsys):
    code = _main(monkeypatch, tmp_path, "logger=none", "num_clients=100", "data.source.num_train=20")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "num_clients" in err


def test_multirun_writes_one_folder_per_job_and_one_group_per_invocation(monkeypatch, tmp_path):
    args = [*FAST, "num_rounds=1", "local.max_steps=1", "eval.bleu_samples=0"]
    monkeypatch.chdir(tmp_path)
    groups = []
    for sweep in ("a/fed", "b/fed"):  # two invocations into folders of the same name
        monkeypatch.setattr(sys, "argv", ["fedtune", "-m", *args, "lora.r=4,8", "seed=0,1",
                                          f"hydra.sweep.dir={sweep}"])
        cli.main()
        jobs = sorted(p.name for p in (tmp_path / sweep).iterdir() if p.is_dir())
        assert jobs == ["0", "1", "2", "3"]
        for job in jobs:
            assert (tmp_path / sweep / job / "metrics.jsonl").exists()
            assert (tmp_path / sweep / job / ".hydra" / "overrides.yaml").exists()
        groups.append({json.loads((tmp_path / sweep / job / "summary.json").read_text())["wandb/group"]
                       for job in jobs})
    assert len(groups[0]) == len(groups[1]) == 1  # the jobs of one command share a group
    assert groups[0] != groups[1] and all(g.startswith("fed-") for g in groups[0] | groups[1])


def test_single_run_with_wandb_offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = [a for a in FAST if a != "logger=none"]
    monkeypatch.setattr(sys, "argv", ["fedtune", *args, "num_rounds=1", "logger=wandb"])
    cli.main()
    (run_dir,) = list((tmp_path / "outputs" / "runs").iterdir())
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "summary.json").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_encoder_model_for_generation_is_one_line(monkeypatch, tmp_path, capsys):
    code = _main(monkeypatch, tmp_path, "model=minilm", "data=synthetic")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "classify_with=head" in err


def _composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    from fedtune.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_bitsandbytes_is_hidden_only_when_no_job_quantizes(monkeypatch) -> None:
    # The decision by hand: hide iff nothing imported it yet, no job loads a quantized base, no resume.
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    plain, nf4, int8 = _composed(), _composed("quant=nf4"), _composed("quant=int8")
    resumed = _composed("resume=/somewhere")
    assert not cli.skip_bitsandbytes([plain, nf4]) and "bitsandbytes" not in sys.modules
    assert not cli.skip_bitsandbytes([int8]) and "bitsandbytes" not in sys.modules
    assert not cli.skip_bitsandbytes([plain, resumed]) and "bitsandbytes" not in sys.modules
    assert cli.skip_bitsandbytes([plain, plain])
    assert sys.modules["bitsandbytes"] is None  # Python's "absent" marker
    import importlib.util

    assert importlib.util.find_spec("bitsandbytes") is None
    with pytest.raises(ImportError):
        import bitsandbytes  # noqa: F401
    monkeypatch.setitem(sys.modules, "bitsandbytes", object())  # already imported: left alone
    assert not cli.skip_bitsandbytes([plain])


def test_console_run_without_quantization_never_imports_bitsandbytes(tmp_path) -> None:
    # Observed from outside: -X importtime lists every module the process imported. peft would pull
    # bitsandbytes.* in (it is installed); the fresh console process hides it and still runs.
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedtune", *FAST, "num_rounds=1",
                           "local.max_steps=1", "eval.bleu_samples=0", f"output_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "peft" in imported and "torch" in imported
    assert not [m for m in imported if m.startswith("bitsandbytes.")]
