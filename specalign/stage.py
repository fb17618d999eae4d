"""Decorator that turns a function of a DictConfig into a `specalign <stage>` Hydra app.

User-facing errors (SpecalignError) become one clear line on stderr and exit code 2,
instead of a traceback. `OutputCheck`, a Hydra callback every stage config names, refuses an
`out=` the stage may not write into before Hydra writes its own records there.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from specalign.errors import SpecalignError
from specalign.paths import CONF_DIR

log = logging.getLogger("specalign")


def hydra_stage(config_name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        import hydra

        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
        def app(cfg):
            try:
                return fn(cfg)
            except SpecalignError as e:
                fail(e)

        @functools.wraps(fn)
        def main():
            return app()

        main.run = fn  # the plain function, for tests and for the pipeline
        return main

    return wrap


def fail(e: SpecalignError) -> None:
    """Print a user-facing error as one line and exit 2 (a traceback with SPECALIGN_TRACEBACK set)."""
    if os.environ.get("SPECALIGN_TRACEBACK"):
        raise e
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


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


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover -- hydra is a dependency; this keeps the module importable alone
    _HydraCallback = object


class OutputCheck(_HydraCallback):
    """Runs before Hydra makes the run directory and writes its records: a stage's `out` must be new, empty
    or the stage's own (specalign.io.check_output). A sweep directory is claimed for the whole sweep; its
    jobs (out/<n>) are claimed by the stage itself."""

    def on_run_start(self, config, config_name: str | None = None, **kwargs) -> None:
        from omegaconf import OmegaConf

        from specalign.io import check_output, claim_file

        out = OmegaConf.select(config, "out", throw_on_missing=False)
        if out is None or not config_name:
            return  # the stage reports a missing out= itself
        try:
            if config_name in FILE_OUTPUTS:
                claim_file(out, config_name)
            else:
                check_output(out, config_name, config.hydra.job.name, legacy_owner(config_name))
        except SpecalignError as e:
            fail(e)

    def on_multirun_start(self, config, config_name: str | None = None, **kwargs) -> None:
        from specalign.io import claim_output

        if not config_name or config_name in FILE_OUTPUTS:
            return
        try:
            claim_output(config.hydra.sweep.dir, f"{config_name} sweep")
        except SpecalignError as e:
            fail(e)
