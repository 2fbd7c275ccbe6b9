"""The parallel engine: same metrics and bytes as sequential; a worker's failure stops the run at once.

Workers are real processes (2 on CPU), forked from the test process once its world is built.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST, read_metrics

from fedtune import cli
from fedtune.engine.parallel import ParallelEngine
from fedtune.errors import ConfigError

PARALLEL = ("engine=parallel", "engine.workers=2", "engine.timeout_s=120")
NOT_COMPARED = ("time/", "mem/process_rss_bytes")


def _worker_processes() -> list[psutil.Process]:
    """Live CPU workers: this process's children forked by the engine (not zombies, not helpers)."""
    found = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "multiprocessing" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.parametrize("bad", ["workers=0", "workers=two", "timeout_s=0", "threads=-1"])
def test_bad_knobs_are_config_errors(bad):
    key, value = bad.split("=")
    with pytest.raises(ConfigError, match=f"engine.{key}"):
        ParallelEngine(**{key: int(value) if value.lstrip("-").isdigit() else value})


def test_backend_is_not_a_knob():
    # Workers always talk gloo (pickled CPU tensors, point to point): there is no NCCL path to choose.
    with pytest.raises(TypeError):
        ParallelEngine(backend="nccl")


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_parallel_equals_sequential(run_fedtune, strategy, monkeypatch):
    # 3 clients on 2 workers: one worker runs two clients back to back; `local` moves each client's
    # persistent adapter and AdamW state through rank 0's store and back every round.
    from fedtune.client.runtime import ClientRuntime

    common = (f"strategy={strategy}", "num_clients=3", "seed=7")
    seq = read_metrics(run_fedtune(*common)[1])
    calls = []  # rank 0's runtime must run no client update: the workers do
    real_run = ClientRuntime.run
    monkeypatch.setattr(ClientRuntime, "run", lambda self, *a, **k: calls.append(k) or real_run(self, *a, **k))
    par = read_metrics(run_fedtune(*common, *PARALLEL)[1])
    assert calls == []
    assert len(seq) == len(par) == 2
    for s, p in zip(seq, par):
        keys = {k for k in s if not k.startswith(NOT_COMPARED)}
        assert keys == {k for k in p if not k.startswith(NOT_COMPARED)}
        for k in sorted(keys):
            if "bytes" in k:
                assert p[k] == s[k], k  # measured bytes: exactly equal
            else:
                assert p[k] == pytest.approx(s[k], rel=1e-5, abs=1e-7), k
    assert not _worker_processes()


def test_split_under_parallel_runs_on_rank_0(run_fedtune):
    # Split learning's server computes during every update, so engine=parallel starts NO workers and
    # runs the updates in the server process, one after another (the same code path as sequential):
    # the metrics equal sequential's and nothing was forked.
    common = ("strategy=split", "num_clients=3", "seed=7")
    seq = read_metrics(run_fedtune(*common)[1])
    par = read_metrics(run_fedtune(*common, *PARALLEL)[1])
    for s, p in zip(seq, par, strict=True):
        assert {k: v for k, v in s.items() if not k.startswith(NOT_COMPARED)} == \
            {k: v for k, v in p.items() if not k.startswith(NOT_COMPARED)}
    assert not _worker_processes()


@pytest.mark.parametrize(("how", "error", "message"), [
    ("raise", RuntimeError, r"^worker [12] failed on client 1 in round 0: ValueError: injected failure$"),
    ("config", ConfigError, r"^strategy.how=config: an injected one-line user error$"),
    ("kill", RuntimeError, r"^worker [12] exited with code -9 in round 0 without reporting an error"),
])
def test_worker_failure_stops_the_run(run_fedtune, how, error, message):
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        run_fedtune(*PARALLEL, "strategy._target_=parallel_faults.FailingFedAvg", f"+strategy.how={how}")
    assert time.perf_counter() - start < 30  # a start-up (fork + build) plus one short round, not a timeout
    deadline = time.monotonic() + 5
    while _worker_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _worker_processes()


def test_results_stream_to_rank_0_as_each_client_finishes(run_fedtune, tmp_path):
    # 3 clients on 2 workers: 0 and 1 start at once, 2 goes to the first worker free. Client 2's update
    # waits until rank 0 has folded another client's: rank 0 must pass each result on as soon as it can.
    gate = tmp_path / "gate"
    _, out = run_fedtune(*PARALLEL, "strategy._target_=parallel_faults.GatedFedAvg", f"+strategy.gate={gate}",
                         "+strategy.wait_client=2", "num_clients=3", "num_rounds=1")
    assert gate.exists() and len(read_metrics(out)) == 1


def test_a_free_worker_takes_the_next_client(run_fedtune, tmp_path):
    # 4 clients on 2 workers; client 0's update waits until clients 1, 2 and 3 are done. Only a work queue
    # lets the round finish: the other worker must run all three while the first is busy with client 0 (a
    # split made up front gives each worker two clients, and client 0's worker would still hold one).
    _, out = run_fedtune(*PARALLEL, "strategy._target_=parallel_faults.WaitingFedAvg", f"+strategy.marks={tmp_path}",
                         "+strategy.wait_client=0", "+strategy.wait_for=[1,2,3]", "num_clients=4", "num_rounds=1")
    assert len(read_metrics(out)) == 1
    assert sorted(p.name for p in tmp_path.glob("done-*")) == ["done-0", "done-1", "done-2", "done-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~30 s: two torchrun agents and two fresh interpreters importing fedtune
def test_two_nodes_under_torchrun(run_fedtune, tmp_path):
    # Two torchrun agents on this machine stand for two nodes (c10d rendezvous on 127.0.0.1): rank 0
    # runs the CLI and the loop, the other node's rank serves it. Same metrics as sequential.
    # engine.threads=1: both "nodes" share this machine's cores (auto would give each node all of them).
    if "serve_torchrun_worker" not in Path(cli.__file__).read_text():
        pytest.skip("fedtune.cli does not hand ranks > 0 to serve_torchrun_worker yet")
    overrides = [*FAST, "num_clients=3", "seed=3"]
    seq = read_metrics(run_fedtune(*overrides, fast=False)[1])
    out = tmp_path / "torchrun"
    rdzv = [f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-backend=c10d", "--rdzv-id=fedtune-test"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", *rdzv,
           "-m", "fedtune", *overrides, "engine=parallel", "engine.threads=1", f"output_dir={out}"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    par = read_metrics(out)
    for s, p in zip(seq, par, strict=True):
        assert p["comm/total_bytes"] == s["comm/total_bytes"]
        assert p["eval/loss"] == pytest.approx(s["eval/loss"], rel=1e-5)
        assert p["train/loss"] == pytest.approx(s["train/loss"], rel=1e-5)


def test_killed_worker_is_one_line_exit_3(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedtune", *FAST, *PARALLEL, "strategy._target_=parallel_faults.FailingFedAvg",
                                      "+strategy.how=kill"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 3, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fedtune: error: worker ") and "exited with code -9" in err
