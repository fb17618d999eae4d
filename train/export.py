"""`specalign export run=RUN out=DIR [format=native|speculators] [ckpt=best|last]`

Turns a training checkpoint into a drafter directory that `specalign.adapters.export_format.load_drafter`
(and, for format=speculators, vLLM) loads without the training code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from specalign.adapters.export_format import build_drafter, save_drafter

from specalign.errors import DataError
from specalign.io import claim_output
from specalign.stage import hydra_stage


def load_checkpoint(run: str | Path, ckpt: str = "best") -> dict:
    path = Path(run) / "checkpoints" / f"{ckpt}.ckpt"
    if not path.exists():
        raise DataError(path, "no such checkpoint", "is this a run directory written by `specalign train`?")
    return torch.load(path, map_location="cpu", weights_only=True)


def drafter_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    model = build_drafter(checkpoint["drafter_type"], checkpoint["hyper_parameters"]["model"])
    model.load_state_dict({k[len("model."):]: v for k, v in checkpoint["state_dict"].items()
                           if k.startswith("model.")})
    return model.eval()


def verifier_of(source: dict | None, verifier: str | None) -> str | None:
    """What the speculators config names as the verifier: the id or path the user gives, else the target
    checkpoint the store was extracted from, as an absolute path (a relative one fails elsewhere)."""
    if verifier:
        return verifier
    path = (((source or {}).get("identity") or {}).get("target") or {}).get("path")
    return str(Path(path).resolve()) if path else None


def export_run(run: str | Path, out: str | Path, format: str = "native", ckpt: str = "best",
               verifier: str | None = None) -> Path:
    checkpoint = load_checkpoint(run, ckpt)
    claim_output(out, "export", {"run": str(Path(run).resolve()), "format": format, "ckpt": ckpt})
    source = checkpoint["hyper_parameters"].get("source")
    extra = {"source_store": source, "verifier": verifier_of(source, verifier),
             "trained": {"run": str(run), "checkpoint": ckpt, "global_step": checkpoint["global_step"]}}
    return save_drafter(drafter_from_checkpoint(checkpoint), out, extra, format)


@hydra_stage("export")
def main(cfg: DictConfig) -> None:
    print(export_run(cfg.run, cfg.out, cfg.format, cfg.ckpt, cfg.get("verifier")))


if __name__ == "__main__":
    main()
