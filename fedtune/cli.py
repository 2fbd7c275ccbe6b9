"""The ``fedtune`` command: Hydra CLI around :func:`fedtune.run.run`.

Before Hydra runs anything, every job of the command line (each combination of a ``-m`` sweep) is
composed and validated, so a bad override stops the whole command with one line and exit code 2,
before any run folder is written.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import cast

from omegaconf import DictConfig

from fedtune.config import CONF_DIR
from fedtune.errors import ConfigError, Interrupted, WorkerError

log = logging.getLogger("fedtune")

# Hydra flags that take a value, and flags after which there is nothing to validate.
_VALUE_FLAGS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-p", "--package",
                "--experimental-rerun", "-c", "--cfg", "--info"}
_NO_RUN_FLAGS = {"-h", "--help", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-c", "--cfg",
                 "--resolve"}


def _overrides(argv: list[str]) -> list[str] | None:
    """The override arguments of ``argv``, or None when the command runs no experiment."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in _NO_RUN_FLAGS:
            return None
        elif arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _one_line(err: Exception) -> str:
    """Hydra's multi-line composition errors, as one actionable line."""
    text = str(err)
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m.group(1)
        return f"{key}: unknown config key (check the spelling; `fedtune --cfg job` lists every key; +{key}=... adds a new one)"
    if m := re.search(r"Could not find '([^']+)/([^']+)'", text):
        group, name = m.group(1), m.group(2)
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return f"{group}={name}: no such config; available {group} options: {', '.join(options) or '(none)'}"
    if m := re.search(r"Could not load '([^']+)/([^']+)'", text):
        return f"{m.group(1)}={m.group(2)}: no such config (see conf/{m.group(1)}/)"
    return " ".join(text.split())


def precheck(argv: list[str], *, lean: bool = False) -> None:
    """Compose and validate every job the command line would run; raise ConfigError on the first bad one.

    ``lean``: a fresh process (the console script) whose jobs all use full-precision base weights hides
    bitsandbytes before anything imports it (:func:`skip_bitsandbytes`)."""
    overrides = _overrides(argv)
    if overrides is None:
        return
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    for override in overrides:  # one at a time, so a value Hydra's grammar cannot read is named
        try:
            parser.parse_overrides([override])
        except HydraException as err:
            raise ConfigError(unparsable_line(override, str(err), multirun="-m" in argv or "--multirun" in argv)) \
                from None
    try:
        parsed = parser.parse_overrides(overrides)
        jobs = [combo for batch in BasicSweeper.split_arguments(parsed, None) for combo in batch]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfgs = [(combo, compose(config_name="config", overrides=list(combo), return_hydra_config=True))
                    for combo in jobs]
            if lean:
                skip_bitsandbytes([cfg for _, cfg in cfgs])
            from fedtune.config import build, validate  # imports torch (and peft, below): after the decision
            from fedtune.data.sources import check_data
            from fedtune.strategies.base import check_schedule

            for combo, cfg in cfgs:
                _refuse_unread_keys(combo, cfg)
                validate(cfg)
                for node in (cfg.partition, cfg.schedule):  # their constructors check their settings
                    build(node)
                check_schedule(build(cfg.strategy), cfg.schedule.mode)
                check_data(cfg.data)  # data.path exists, data=files' columns are in its header
                if "name_or_path" in cfg.model:  # a pretrained model: its source exists (nothing loaded)
                    from fedtune.models.pretrained import check_source

                    check_source(cfg.model.name_or_path, name=cfg.model.name, packaged=cfg.model.get("packaged"))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None


def skip_bitsandbytes(cfgs: list[DictConfig]) -> bool:
    """Hide bitsandbytes from this process when no job quantizes its base weights.

    peft imports bitsandbytes whenever it is installed (``peft.helpers``, and LoRA's layer dispatch asks
    ``is_bnb_available()``), which costs about a second of start-up on CPU even when nothing is
    quantized. ``sys.modules[name] = None`` is Python's documented way to make a module absent: its
    import raises ImportError and ``importlib.util.find_spec`` returns None, so peft and transformers
    treat it as not installed. Only for a fresh process (nothing imported it yet) whose every job has
    ``quant.load_in: null`` and is not a resume (which runs the saved config's quant); returns whether it
    hid it.
    """
    if "bitsandbytes" in sys.modules or any(cfg.quant.get("load_in") is not None or cfg.get("resume")
                                            for cfg in cfgs):
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    return True


def unparsable_line(override: str, error: str, *, multirun: bool = False) -> str:
    """One line for an override Hydra's grammar rejects (``~``, ``#``, ``'``, non-ASCII ... in an
    unquoted value): which character, and the override quoted so that Hydra reads it as a string."""
    key, sep, value = override.partition("=")
    where = ""
    lines = error.splitlines()
    if lines and lines[0].startswith("LexerNoViableAltException: ") and len(lines) > 1 and "^" in lines[1]:
        pos = lines[1].index("^") - len("LexerNoViableAltException: ")
        if 0 <= pos < len(override):
            where = f" at {override[pos]!r}"
    if not sep:
        return f"{override}: Hydra cannot parse this argument{where} (expected key=value)"
    parts = value.split(",") if multirun and "," in value else [value]  # a sweep: quote each value
    if not any('"' in v for v in parts):
        quoted = ",".join(f'"{v}"' for v in parts)
        shell = f"'{key}={quoted}'" if "'" not in quoted else f'"{key}={quoted.replace(chr(34), chr(92) + chr(34))}"'
    else:
        quoted = ",".join("'" + v.replace("'", "\\'") + "'" for v in parts)
        shell = "'" + f"{key}={quoted}".replace("'", "'\\''") + "'"
    return (f"{override}: Hydra's override grammar cannot read this value{where}; quote it for Hydra, inside "
            f"shell quotes: {shell}")


def _refuse_unread_keys(combo: list[str], cfg: DictConfig) -> None:
    """``+key=value`` adds a key the config does not have. Only a component built from a ``_target_``
    reads keys beyond its yaml (as constructor arguments, which it checks); anywhere else nothing would
    read it, and the run would silently ignore it: refuse."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    added = [o for o in OverridesParser.create().parse_overrides(list(combo)) if o.is_add() or o.is_force_add()]
    added = [o for o in added if not o.key_or_group.startswith("hydra.")
             and not (CONF_DIR / o.key_or_group.replace(".", "/")).is_dir()]  # `+group=option` adds a config
    if not added:
        return
    plain = [c for c in combo if not c.startswith("+")]
    base = compose(config_name="config", overrides=plain)
    for o in added:
        key = o.key_or_group
        if OmegaConf.select(base, key, default=_ABSENT) is not _ABSENT:
            continue  # ++ on a key that exists is a plain change
        parent = OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else cfg
        if not (isinstance(parent, DictConfig) and "_target_" in parent):
            raise ConfigError(f"{key}: no such config key, and nothing reads it, so it would have no effect "
                              "(check the spelling; `fedtune --cfg job` lists every key)")


_ABSENT = object()


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fedtune.run import run

    hc = HydraConfig.get()
    assert hc.mode is not None  # hydra sets hydra.mode (RUN or MULTIRUN) before it calls the task
    multirun = hc.mode.name == "MULTIRUN"
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(hc.runtime.output_dir)
    try:
        from fedtune.engine.parallel import under_torchrun

        if under_torchrun() and cfg.engine._target_ not in ("fedtune.engine.parallel.ParallelEngine",
                                                             "fedtune.engine.auto.auto_engine"):
            raise ConfigError(f"engine={hc.runtime.choices.get('engine')}: under torchrun use engine=parallel")
        if cfg.resume:
            cfg, out_dir = resumed_config(cfg, list(hc.overrides.task))
        run(
            cfg,
            out_dir=out_dir,
            resume=bool(cfg.get("resume")),
            choices={k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")},
            group=wandb_group(hc.sweep.dir) if multirun else None,
            job_name=(hc.job.override_dirname or None) if multirun else None,
        )
    except ConfigError as err:
        _discard_if_unstarted(out_dir)
        sys.stderr.write(f"fedtune: error: {err}\n")
        sys.exit(2)
    except Interrupted as err:
        sys.stderr.write(f"fedtune: {err.message}\n")
        sys.exit(130)
    except WorkerError as err:
        sys.stderr.write(f"fedtune: error: {err}\n")
        sys.exit(3)
    except OSError as err:  # read-only folder, a path under a file, disk full ...
        _discard_if_unstarted(out_dir)
        sys.stderr.write(f"fedtune: error: {os_error_line(err, out_dir)}\n")
        sys.exit(2)


def os_error_line(err: OSError, where: Path, *, running: bool = True) -> str:
    """One line for a file-system failure: the path and what went wrong, and that earlier rounds stand."""
    path = err.filename or where
    what = err.strerror or type(err).__name__
    hints: dict[int | None, str] = {
        errno.ENOSPC: "free some space", errno.EACCES: "choose a writable folder (output_dir=...)",
        errno.EROFS: "choose a writable folder (output_dir=...)",
        errno.ENOTDIR: "a part of the path is a file; choose another folder"}
    hint = hints.get(err.errno, "")  # errno is None for an OSError raised without one
    line = f"{path}: {what}" + (f"; {hint}" if hint else "")
    return line + (f" (rounds checkpointed before this stay resumable: resume={where})" if running else "")


INVOCATION_ENV = "FEDTUNE_INVOCATION_ID"
FRESH_ENV = "FEDTUNE_FRESH_DIR"  # the output folder this command created (a failed start may remove it)
RUN_MARKERS = ("metrics.jsonl", "config.yaml", "checkpoint", ".hydra")


def _holds_run(folder: Path) -> bool:
    return any((folder / m).exists() for m in RUN_MARKERS)


def exclusive_dir(parent: Path, name: str) -> Path:
    """Create ``parent/name`` atomically (``name_1``, ``name_2`` ... when it exists): two commands started
    in the same second never share a folder."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        candidate = parent / (name if i == 0 else f"{name}_{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"{parent}: could not create a new folder {name}_N there")


def _quote(path: Path) -> str:
    text = str(path)
    return text if re.fullmatch(r"[\w./-]+", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def placement(argv: list[str], overrides: list[str]) -> list[str]:
    """Overrides that put Hydra's files (``.hydra/``, the log) in the run's own folder, created by this
    command alone, before Hydra writes anything; raises ConfigError for a folder that already holds a run.

    - no folder given: ``outputs/runs/<timestamp>`` (multirun: ``outputs/multiruns/<timestamp>``), made
      exclusively;
    - ``output_dir=X`` or ``hydra.run.dir=X``: X must not hold a run; Hydra's files go into X too;
    - ``resume=X``: Hydra's log appends to X's; its ``.hydra/`` (the run's record) is left as it is.
    """
    given = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in overrides if "=" in o}
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    if "-m" in argv or "--multirun" in argv:
        if "hydra.sweep.dir" in given:
            return []
        folder = exclusive_dir(Path("outputs/multiruns"), stamp)
        os.environ[FRESH_ENV] = str(folder.resolve())
        return [f"hydra.sweep.dir={_quote(folder)}"]
    if given.get("resume") not in (None, "null"):
        folder = Path(given["resume"])
        if not (folder / "config.yaml").exists():
            raise ConfigError(f"resume={folder}: not a fedtune run folder (no config.yaml); pass the run's folder")
        return [f"hydra.run.dir={_quote(folder)}", "hydra.output_subdir=null"]
    target = given.get("output_dir") if given.get("output_dir") not in (None, "null") else given.get("hydra.run.dir")
    if target is None:
        folder = exclusive_dir(Path("outputs/runs"), stamp)
        os.environ[FRESH_ENV] = str(folder.resolve())
        return [f"hydra.run.dir={_quote(folder)}"]
    folder = Path(target)
    if folder.exists() and _holds_run(folder):
        key = "output_dir" if "output_dir" in given else "hydra.run.dir"
        raise ConfigError(f"{key}={folder}: already holds a run; choose a new folder (or resume={folder})")
    if not folder.exists():
        folder.mkdir(parents=True)
        os.environ[FRESH_ENV] = str(folder.resolve())
    return [] if "hydra.run.dir" in given else [f"hydra.run.dir={_quote(folder)}"]


def _discard_if_unstarted(out_dir: Path) -> None:
    """A run that failed before its first round leaves no folder that looks like a run: remove its
    folder when this command created it and no round was logged."""
    fresh = os.environ.get(FRESH_ENV)
    if fresh is None or (out_dir / "metrics.jsonl").exists() or not out_dir.exists():
        return
    resolved = out_dir.resolve()
    if resolved == Path(fresh) or Path(fresh) in resolved.parents:
        shutil.rmtree(resolved, ignore_errors=True)


def new_invocation() -> str:
    """A fresh id for this command (time + random), in the environment so that jobs a launcher runs in
    other processes (submitit, torchrun ranks) see the same one."""
    os.environ[INVOCATION_ENV] = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    return os.environ[INVOCATION_ENV]


def wandb_group(sweep_dir: str) -> str:
    """The W&B group of a ``-m`` sweep's jobs: the sweep folder's name plus this invocation's id.
    Every job of one command shares it; two commands never do, even into folders of the same name
    (``.../fed`` of two replications, or the same ``hydra.sweep.dir`` run twice)."""
    return f"{Path(sweep_dir).name}-{os.environ.get(INVOCATION_ENV) or new_invocation()}"


def resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The config of the run being resumed (its .hydra/config.yaml); ``num_rounds=`` may extend it."""
    from omegaconf import OmegaConf

    folder = Path(cfg.resume)
    saved = folder / "config.yaml"
    if not saved.exists():
        raise ConfigError(f"resume={folder}: not a fedtune run folder (no config.yaml); pass the run's folder")
    old = cast(DictConfig, OmegaConf.load(saved))  # a run's config.yaml is a mapping
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "resume" or key.startswith("hydra."):
            continue
        if key not in RESUME_KEYS and not key.startswith(RESUME_PREFIXES):
            raise ConfigError(f"{key}: a resumed run keeps its own config ({saved}); on resume only "
                              f"{', '.join(RESUME_KEYS)} and engine.* may change; start a new run to change {key}")
        OmegaConf.update(old, key, OmegaConf.select(cfg, key), merge=False)
    old.resume = str(folder)
    return old, folder


# What `resume=` may change: how long, and where and how fast it runs (never the maths of a round).
RESUME_KEYS = ("num_rounds", "threads", "device", "engine")
RESUME_PREFIXES = ("engine.",)


def entry() -> None:
    """The console script and ``python -m fedtune``: :func:`main` in a process of its own, which may
    leave out imports its jobs do not use (tests call :func:`main` in-process, where it must not)."""
    main(lean=True)


def main(*, lean: bool = False) -> None:
    """Run the command line in ``sys.argv`` (see :func:`entry`)."""
    if os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from fedtune.engine.parallel import serve_torchrun_worker  # torchrun ranks > 0: workers, no Hydra

        sys.exit(serve_torchrun_worker())
    new_invocation()
    os.environ.pop(FRESH_ENV, None)
    try:
        precheck(sys.argv[1:], lean=lean)
        overrides = _overrides(sys.argv[1:])
        if overrides is not None:
            sys.argv += placement(sys.argv[1:], overrides)
    except ConfigError as err:
        sys.stderr.write(f"fedtune: error: {err}\n")
        sys.exit(2)
    except OSError as err:  # the output folder cannot be made
        sys.stderr.write(f"fedtune: error: {os_error_line(err, Path('outputs'), running=False)}\n")
        sys.exit(2)
    import hydra

    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_task)()
    except KeyboardInterrupt:  # outside a run (start-up, between sweep jobs): nothing to resume
        sys.stderr.write("fedtune: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
