"""Reading a drafter directory's two files with one-line errors that name the file at fault.

`load_checked(path, build)` reads config.json and model.safetensors, builds the module with
`build(config, state)` and loads the weights: invalid JSON, a truncated or damaged weight file,
a config whose fields are missing or wrong, and a config that no longer fits the weights (e.g.
an edited vocabulary size) each become a DataError instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from specalign.errors import DataError
from specalign.identity import read_drafter_config

EXPORT_AGAIN = "export the drafter again (specalign export run=RUN out=DIR)"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(path, "missing from the drafter directory", EXPORT_AGAIN)
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise DataError(path, f"not a readable safetensors file ({' '.join(str(e).split())[:160]})",
                        f"the file is truncated or damaged: {EXPORT_AGAIN}") from None


def load_checked(path: str | Path, build: Callable[[dict, dict], nn.Module]) -> nn.Module:
    path = Path(path)
    cfg = read_drafter_config(path)
    state = read_weights(path / "model.safetensors")
    try:
        model = build(cfg, state)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(path / "config.json", f"not a valid drafter config ({type(e).__name__}: {e})",
                        EXPORT_AGAIN) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise DataError(path / "model.safetensors", f"the weights do not fit config.json ({first[:200]}); "
                        "was either file edited?", EXPORT_AGAIN) from None
    return model
