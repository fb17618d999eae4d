"""Decorator that turns a function of a DictConfig into a `specalign <stage>` Hydra app.

Whatever the user can act on becomes one line on stderr and exit code 2 instead of a traceback
(SPECALIGN_TRACEBACK=1 shows the traceback):
- SpecalignError raised by a stage;
- Hydra's and OmegaConf's own errors (an override that does not parse, a key the config lacks, an
  interpolation that does not resolve), named by their key;
- a command-line value that is missing, empty or of the wrong type (`check_config`);
- an `out=` the stage may not write into (specalign.io.check_output);
- an OSError naming a file (a full disk, a read-only or forbidden output, a missing input).
The two checks run in `StageCheck`, a Hydra callback every stage config names, before Hydra makes the
run directory and writes its records there: a refused command line leaves nothing behind.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specalign.errors import ConfigError, SpecalignError
from specalign.paths import CONF_DIR

log = logging.getLogger("specalign")

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover -- hydra is a dependency; this keeps the module importable alone
    _HydraCallback = object


def hydra_stage(config_name: str) -> Callable:
    """Decorator: `fn(cfg)` becomes the stage's `main()`, a Hydra app over conf/<config_name>.yaml (`fn` stays
    reachable as `main.run`, for tests and for the pipeline)."""
    def wrap(fn: Callable) -> Callable:
        main = functools.wraps(fn)(stage_app(config_name, lambda: fn))
        main.run = fn
        return main

    return wrap


def stage_app(config_name: str, task: Callable[[], Callable]) -> Callable[[], Any]:
    """The Hydra app of a stage: its config composed and checked (StageCheck, before anything is written), then
    `task()(cfg)`. `task` is called only then, so the `specalign` command imports a stage's module (torch,
    Lightning: seconds) only once its command line has passed the checks."""
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def app(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:    # a sweep's values are known per job only
                check_config(cfg, hc, config_name)
            return task()(cfg)
        except Exception as e:  # noqa: BLE001 -- reported here, before Hydra adds its own line
            fail(user_error(e) or e)

    def main():
        os.environ["HYDRA_FULL_ERROR"] = "1"   # Hydra raises its errors, they are reported below
        try:
            return app()
        except Exception as e:  # noqa: BLE001 -- what is not the user's to act on is raised again
            fail(user_error(e) or e)

    return main


def fail(e: BaseException) -> None:
    """Print a user-facing error as one line and exit 2; anything else, or SPECALIGN_TRACEBACK set: raise."""
    if not isinstance(e, SpecalignError) or os.environ.get("SPECALIGN_TRACEBACK"):
        raise e
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


# ------------------------------------------------------------------------------ errors the user can act on

WRITE_ERRNOS = {errno.ENOSPC: "free space there or choose another out=", errno.EDQUOT: "the disk quota is full",
                errno.EROFS: "choose a writable out=", errno.EACCES: "check its permissions or choose another path",
                errno.EPERM: "check its permissions or choose another path"}


def user_error(e: BaseException) -> SpecalignError | None:
    """`e` as one line, or None when it is a bug (the traceback is what helps then)."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, SpecalignError):
        return e
    if isinstance(e, HydraException | OmegaConfBaseException) and not isinstance(e, InstantiationException):
        return ConfigError(config_message(e))
    if isinstance(e, OSError) and e.filename is not None:
        hint = WRITE_ERRNOS.get(e.errno)
        return SpecalignError(f"{e.filename}: {e.strerror or e}" + (f" ({hint})" if hint else ""))
    return None


def config_message(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (and the OmegaConf error behind Hydra's) as one line."""
    lines: list[str] = []
    for err in (e, e.__cause__):
        if err is None:
            continue
        for line in str(err).splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key:", "object_type", "reference_type")) and line not in lines:
                lines.append(line)
    key = getattr(e, "full_key", None) or getattr(e.__cause__, "full_key", None)
    msg = "; ".join(line.rstrip(".") for line in lines)
    stage = os.environ.get("SPECALIGN_STAGE", "<stage>")
    return (f"{key}: {msg}" if key and key not in msg else msg) + f" (`specalign {stage} --help` lists the keys)"


# ------------------------------------------------------------------------------ command-line values

# keys that name files or directories (the last part of a dotted key)
PATH_KEYS = {"store", "out", "run", "runs", "src", "path", "root", "drafter", "no_draft", "world", "cache"}
# of those, the ones a stage reads: given on the command line, they must exist
INPUT_KEYS = {"store", "run", "runs", "src", "path", "root", "drafter", "no_draft", "world"}
# keys whose default is null, by what they hold when set
NULLABLE = {"limit": int, "clips": int, "max_new_tokens": int, "num_attention_heads": int,
            "num_key_value_heads": int, "intermediate_size": int, "temperature": float}
# keys whose type is wider than their default's (Lightning takes "auto" or a list of devices)
FLEXIBLE = {"trainer.devices"}
# keys that also take a list of values of their default's type (evaluate's gamma: a table over gamma)
LISTABLE = {"gamma"}
_ABSENT = object()


# stages whose `out` is a file rather than a directory
FILE_OUTPUTS = ("plot",)


def legacy_owner(stage: str) -> Callable[[Path], bool] | None:
    """How a stage recognises its own output written before ownership markers existed."""
    if stage in ("extract", "import-pairs"):
        from specalign.data.store import is_store

        return is_store
    if stage == "train":
        from specalign.train.train import is_run

        return is_run
    return None


class StageCheck(_HydraCallback):
    """Runs before Hydra makes the run (or sweep) directory and writes its records: the command line's
    values (`check_config`), then the stage's `out`, which must be new, empty or the stage's own
    (specalign.io.check_output). A sweep directory is claimed for the whole sweep; its jobs (out/<n>)
    are claimed by the stage itself, and check their swept values."""

    def on_run_start(self, config, config_name: str | None = None, **kwargs) -> None:
        from omegaconf import OmegaConf

        from specalign.io import check_output, claim_file

        try:
            check_config(config, config.hydra, config_name)
            out = OmegaConf.select(config, "out", throw_on_missing=False)
            if out is None or not config_name:
                return
            if config_name in FILE_OUTPUTS:
                claim_file(out, config_name)
            else:
                check_output(out, config_name, config.hydra.job.name, legacy_owner(config_name))
        except Exception as e:  # noqa: BLE001 -- one line if the user can act on it
            fail(user_error(e) or e)

    def on_multirun_start(self, config, config_name: str | None = None, **kwargs) -> None:
        from specalign.io import claim_output

        try:
            check_config(config, config.hydra, config_name)
            if config_name and config_name not in FILE_OUTPUTS:
                claim_output(config.hydra.sweep.dir, f"{config_name} sweep")
        except Exception as e:  # noqa: BLE001
            fail(user_error(e) or e)


def check_config(cfg, hydra_cfg, config_name: str | None) -> None:
    """Refuse a required key left out (`???`), a path given empty, and a command-line value whose type
    is not its default's (`adapter.lr=abc`, `batch_size=4.5`, `resume=yes`); ConfigError names the key."""
    from omegaconf import OmegaConf

    stage = os.environ.get("SPECALIGN_STAGE", config_name)
    missing = list(missing_keys(cfg))
    if missing:
        raise ConfigError(f"{stage}: " + ", ".join(f"{k}= is required ({expects(k)})" for k in missing)
                          + f"; `specalign {stage} --help` shows the config")
    task, groups = list(hydra_cfg.overrides.task), set(hydra_cfg.runtime.choices)
    overrides = value_overrides(task, groups)
    if not overrides:
        return
    base = defaults_of(config_name, task, groups)
    for key, values in overrides:
        default = default_value(base, key)
        for given in values if values is not None else [OmegaConf.select(cfg, key)]:
            problem = type_problem(key, given, default) or input_problem(key, given)
            if problem:
                raise ConfigError(f"{stage}: {problem}")


def missing_keys(node, prefix: str = ""):
    """Keys left `???` (Hydra's own node aside), without resolving any interpolation."""
    from omegaconf import DictConfig, OmegaConf

    for k in node:
        if not prefix and k == "hydra":
            continue
        if OmegaConf.is_missing(node, k):
            yield f"{prefix}{k}"
        elif not OmegaConf.is_interpolation(node, k) and isinstance(node[k], DictConfig):
            yield from missing_keys(node[k], f"{prefix}{k}.")


def value_overrides(task: list[str], groups: set[str]) -> list[tuple[str, list | None]]:
    """(key, swept values or None) for each key the command line sets a value of (not a config group
    choice or a deletion). A sweep's values are listed when it has a list of them (a choice or range)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(task):
        if o.key_or_group in groups or o.is_delete() or o.key_or_group.startswith("hydra."):
            continue
        values = None
        if o.is_sweep_override():
            try:
                values = list(o.sweep_iterator())
            except Exception:  # noqa: BLE001,S112 -- an interval is the sweeper's to sample; each job checks it
                continue
        out.append((o.key_or_group, values))
    return out


@functools.cache
def _compose(config_name: str, group_choices: tuple[str, ...]):
    from hydra import compose

    return compose(config_name, overrides=list(group_choices))


def defaults_of(config_name: str, task: list[str], groups: set[str]):
    """The stage's config with the command line's group choices (adapter=eagle3) but none of its values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    chosen = tuple(o.input_line for o in OverridesParser.create().parse_overrides(task)
                   if o.key_or_group in groups)
    return _compose(config_name, chosen)


def default_value(base, key: str):
    """The key's default: a value, "???" for a required one, or _ABSENT (new key, or unresolvable)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.select(base, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        return "???"
    except Exception:  # noqa: BLE001 -- a default that does not resolve says nothing about the type
        return _ABSENT


def expects(key: str) -> str:
    return "a path" if key.rsplit(".", 1)[-1] in PATH_KEYS else "a value"


def type_problem(key: str, given, default) -> str | None:
    """What is wrong with `key=given` for a key whose default is `default` (one phrase naming the key), or None."""
    name = key.rsplit(".", 1)[-1]
    if default is _ABSENT or key in FLEXIBLE:
        return None
    if given is None:
        return f"{key}=null: it is required and expects {expects(key)}" if default == "???" else None
    if given == "" and (name in PATH_KEYS or default == "???" or (isinstance(default, str) and default)):
        return f"{key}= is empty: it expects {expects(key)}"
    from omegaconf import ListConfig

    if name in LISTABLE and isinstance(given, ListConfig | list):
        problems = [type_problem(key, g, default) for g in given] or [f"{key}=[]: it expects at least one value"]
        return next((p for p in problems if p), None)
    kind = NULLABLE.get(name) if default is None else type(default)
    shown = "" if default is None or default == "???" else f" (default {default})"
    if kind is bool and not isinstance(given, bool):
        return f"{key}={given}: it expects true or false"
    if kind is int and (isinstance(given, bool) or not isinstance(given, int)):
        return f"{key}={given}: it expects an integer{shown}"
    if kind is float and (isinstance(given, bool) or not isinstance(given, int | float)):
        return f"{key}={given}: it expects a number{shown}"
    return None


def input_problem(key: str, given) -> str | None:
    """An input path (or list of them) that does not exist."""
    from omegaconf import ListConfig

    if key.rsplit(".", 1)[-1] not in INPUT_KEYS or given is None:
        return None
    for path in [given] if isinstance(given, str) else given if isinstance(given, ListConfig | list) else []:
        if isinstance(path, str) and not os.path.exists(path):
            return f"{key}={path}: no such file or directory"
    return None
