"""comm.wire / comm.entropy in whole runs: exact resume of the byte counts, the parallel engine, bad values."""

import sys

import pytest
from conftest import FAST, read_metrics

from fedtune import cli
from fedtune.config import compose_config, validate
from fedtune.errors import ConfigError
from fedtune.run import run

COMPACT = ("strategy=fedavg", "comm.wire=compact", "comm.up=int8", "checkpoint.keep_last=1")


def _bytes(rows):
    return [{k: v for k, v in r.items() if k.startswith("comm/")} for r in rows]


def test_resume_counts_the_same_bytes_as_a_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_config([*FAST, *COMPACT, "num_rounds=4"]), out_dir=straight)
    run(compose_config([*FAST, *COMPACT, "num_rounds=2"]), out_dir=resumed)
    run(compose_config([*FAST, *COMPACT, "num_rounds=4"]), out_dir=resumed, resume=True)
    want = _bytes(read_metrics(straight))
    assert _bytes(read_metrics(resumed)) == want
    # the name tables cross in round 0 only (1 kB and more each way per client), not again after resume
    down = [r["comm/down_bytes"] for r in want]
    assert down[0] - down[1] > 1000 * 2 and down[1] == down[2] == down[3]


def test_parallel_engine_counts_what_sequential_counts(run_fedtune):
    common = ("strategy=fedavg", "num_clients=3", "seed=7", "comm.wire=compact", "comm.entropy=zstd",
              "comm.up=topk0.1+int8")
    seq = _bytes(read_metrics(run_fedtune(*common, "engine=sequential")[1]))
    par = _bytes(read_metrics(run_fedtune(*common, "engine=parallel", "engine.workers=2", "engine.timeout_s=120")[1]))
    assert par == seq
    assert seq[0]["comm/down_bytes"] > seq[1]["comm/down_bytes"]  # the tables: round 0 only


@pytest.mark.parametrize(("arg", "needle"), [
    ("comm.wire=zip", "comm.wire=zip: must be one of safetensors, compact"),
    ("comm.entropy=lz4", "comm.entropy=lz4: must be one of none, zstd"),
])
def test_unknown_wire_or_entropy_is_one_line_exit_2(monkeypatch, tmp_path, capsys, arg, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(compose_config([arg]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedtune", "logger=none", arg])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err == f"fedtune: error: {needle}"
    assert not (tmp_path / "outputs").exists()
