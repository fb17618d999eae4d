"""Decorator that turns a function of a DictConfig into a `specalign <stage>` Hydra app.

User-facing errors (SpecalignError) become one clear line on stderr and exit code 2,
instead of a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

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
                if os.environ.get("SPECALIGN_TRACEBACK"):
                    raise
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(2) from None

        @functools.wraps(fn)
        def main():
            return app()

        main.run = fn  # the plain function, for tests and for the pipeline
        return main

    return wrap
