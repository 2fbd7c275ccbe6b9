"""Output folders: one per run, made by that run alone; Hydra's files in the run's own folder; nothing
written into an existing run before refusing it; no half-made folders; one writer per run folder."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, read_metrics

from fedtune import cli

QUICK = [*FAST, "num_rounds=1", "local.max_steps=1", "eval.bleu_samples=0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["fedtune", *args])
    try:
        cli.main()
    except SystemExit as exc:
        return exc.code
    return 0


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "outputs" / "runs").iterdir()) if (root / "outputs" / "runs").exists() else []


def test_exclusive_dir_adds_a_suffix(tmp_path):
    assert cli.exclusive_dir(tmp_path, "a") == tmp_path / "a"
    assert cli.exclusive_dir(tmp_path, "a") == tmp_path / "a_1"
    assert cli.exclusive_dir(tmp_path, "a") == tmp_path / "a_2"


def test_two_runs_in_the_same_second_get_two_folders(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *a: "2026-01-01_00-00-00")  # the same second, twice
    assert _main(monkeypatch, *QUICK, "seed=1") == 0
    assert _main(monkeypatch, *QUICK, "seed=2") == 0
    runs = _runs(tmp_path)
    assert [p.name for p in runs] == ["2026-01-01_00-00-00", "2026-01-01_00-00-00_1"]
    for run, seed in zip(runs, (1, 2)):
        assert len(read_metrics(run)) == 1
        assert f"seed: {seed}" in (run / "config.yaml").read_text()
        assert f"seed={seed}" in (run / ".hydra" / "overrides.yaml").read_text()


def test_two_processes_started_together_never_share_a_folder(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "fedtune", *QUICK, f"seed={s}"], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    runs = _runs(tmp_path)
    assert len(runs) == 2
    seeds = sorted(int((r / "config.yaml").read_text().split("seed: ")[1].split()[0]) for r in runs)
    assert seeds == [1, 2] and all(len(read_metrics(r)) == 1 for r in runs)


def test_refused_existing_run_dir_is_not_touched(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "myrun"
    assert _main(monkeypatch, *QUICK, f"hydra.run.dir={run}") == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for key in ("hydra.run.dir", "output_dir"):
        assert _main(monkeypatch, *QUICK, "seed=5", f"{key}={run}") == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fedtune: error: {key}={run}: already holds a run; choose a new folder (or resume={run})"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not _runs(tmp_path)


def test_output_dir_and_resume_keep_hydra_files_and_log_in_the_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "mine"
    assert _main(monkeypatch, *QUICK, f"output_dir={run}") == 0
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert "output_dir" in overrides and (run / "cli.log").exists()
    first_log = (run / "cli.log").read_text()
    assert "round 1/1" in first_log
    assert _main(monkeypatch, f"resume={run}", "num_rounds=2") == 0
    assert not _runs(tmp_path)  # no stray outputs/runs/<timestamp>
    assert (run / ".hydra" / "overrides.yaml").read_text() == overrides  # the run's record stays
    log = (run / "cli.log").read_text()
    assert log.startswith(first_log) and "round 2/2" in log[len(first_log):]


def test_a_run_failing_at_start_up_leaves_no_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    quick = [o for o in QUICK if not o.startswith("data.")]  # FAST's sizes are the synthetic source's
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhi,x\nho,x\nhe,x\n")  # a single class: found while loading, after Hydra started
    assert _main(monkeypatch, *quick, "data=files", f"data.path={bad}", "data.task=classify") == 2
    assert "single class" in capsys.readouterr().err
    assert not _runs(tmp_path)
    given = tmp_path / "given"
    assert _main(monkeypatch, *quick, "data=files", f"data.path={bad}", "data.task=classify",
                 f"output_dir={given}") == 2
    assert not given.exists()
    existing = tmp_path / "existing"  # a folder the user made is never removed
    existing.mkdir()
    assert _main(monkeypatch, *quick, "data=files", f"data.path={bad}", "data.task=classify",
                 f"output_dir={existing}") == 2
    assert existing.exists()


def test_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "fedtune", *FAST, "num_rounds=6", "local.max_steps=40",
                               f"output_dir={out}"], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint" / "latest").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "fedtune", f"resume={out}"], cwd=tmp_path, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert holder.poll() is None, "the first run ended before the second started: lengthen it"
    finally:
        holder.kill()
        holder.wait()
    err = second.stderr.strip()
    assert second.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"another fedtune process (PID {holder.pid}) is writing this run" in err


def test_lock_in_process(tmp_path):
    from fedtune.checkpoint import run_lock
    from fedtune.errors import ConfigError

    with run_lock(tmp_path):
        with pytest.raises(ConfigError, match=f"PID {os.getpid()}"), run_lock(tmp_path):
            pass
    with run_lock(tmp_path):  # released: can be taken again
        pass


def test_a_forked_child_does_not_keep_a_killed_run_locked(tmp_path):
    """A run's forked child (the heatmap drawer, a CPU worker) may outlive the run when it is killed; the
    lock must go with the run, not with the child's inherited descriptor."""
    from fedtune.checkpoint import run_lock

    script = (
        "import multiprocessing, os, sys, time\n"
        "from pathlib import Path\n"
        "from fedtune.checkpoint import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n"
        "    child = multiprocessing.get_context('fork').Process(target=time.sleep, args=(30,))\n"
        "    child.start()\n"
        "    Path(sys.argv[2]).write_text(str(child.pid))\n"
        "    os._exit(0)  # dies holding the lock, as under SIGKILL: no unlock, no cleanup\n"
    )
    pid_file = tmp_path.parent / f"{tmp_path.name}.child"
    # (no pipes: the child would keep them open, and run() would wait for it)
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(pid_file)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60, check=True)
    child = int(pid_file.read_text())
    try:
        os.kill(child, 0)  # the child is still alive (and holds whatever it inherited)
        with run_lock(tmp_path):
            pass
    finally:
        os.kill(child, 9)


def test_output_path_under_a_file_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert _main(monkeypatch, *QUICK, f"output_dir={tmp_path / 'afile' / 'run'}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "afile" in err and "Not a directory" in err, err


def test_unwritable_outputs_folder_is_one_line(monkeypatch, tmp_path, capsys):
    # (root ignores permission bits, so the refusal is simulated where the folder is made)
    monkeypatch.chdir(tmp_path)
    real_mkdir = Path.mkdir

    def refuse(self, *a, **k):
        if "outputs" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert _main(monkeypatch, *QUICK) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Permission denied; choose a writable folder" in err, err


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_tmp(monkeypatch, tmp_path, capsys):
    import errno

    import torch

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second round's checkpoint: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", "?")))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    assert _main(monkeypatch, *FAST, "num_rounds=3", f"output_dir={out}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device; free some space" in err, err
    assert f"resume={out}" in err
    assert not list(out.rglob("*.tmp"))
    assert [p.name for p in (out / "checkpoint").glob("round_*.pt")] == ["round_00000.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    assert _main(monkeypatch, f"resume={out}") == 0  # the round before the failure stands
    assert [r["round_idx"] for r in read_metrics(out)] == [0, 1, 2]


def _slow_heatmap(report, path):
    time.sleep(1.0)  # slower than the rounds: the run must wait for the file, not return without it
    return _slow_heatmap.original(report, path)


@pytest.fixture
def slow_heatmap(monkeypatch):
    from fedtune.data import partition_report as pr

    monkeypatch.setattr(_slow_heatmap, "original", pr.save_heatmap, raising=False)
    monkeypatch.setattr(pr, "save_heatmap", _slow_heatmap)  # the forked child runs the patched module


def test_heatmap_drawn_off_the_critical_path_is_logged_and_complete(run_fedtune, slow_heatmap) -> None:
    from fakes import RecordingSink

    RecordingSink.CALLS.clear()
    _, out = run_fedtune("partition=dirichlet", "logger._target_=fakes.RecordingSink", "num_rounds=2")
    png = out / "plots" / "partition.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # complete when run() returned
    calls = RecordingSink.CALLS
    media = [c for c in calls if c[0] == "media" and c[1]]
    assert media == [("media", {"partition/heatmap": png}, [])]  # once, with the file
    assert calls.index(media[0]) < calls.index(("log", 1))  # at the latest with the last round's row
    assert ("media", {}, ["partition/clients"]) in calls  # the table at start, as before


def test_heatmap_file_is_complete_even_when_the_run_fails(run_fedtune, slow_heatmap, monkeypatch, tmp_path) -> None:
    from fedtune import run as run_module

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(run_module, "_evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_fedtune("partition=dirichlet", "num_rounds=1")
    assert (tmp_path / "run1" / "plots" / "partition.png").read_bytes()[:4] == b"\x89PNG"
