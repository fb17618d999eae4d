"""`specalign <stage> [hydra overrides]`: one console script, one Hydra app per stage.

The dispatcher only picks the stage; each stage module owns a `main` decorated with
`specalign.stage.hydra_stage`, whose config is `conf/<stage>.yaml`.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# stage name -> module holding its Hydra `main`
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("specalign.data.synth_stage", "write a synthetic event/video world in the DSEC-clip layout"),
    "import-pairs": ("specalign.data.import_pairs", "turn a token-pair JSON into a tokens-only feature store"),
    "extract": ("specalign.train.extract", "run both VLMs and write a feature store (tokens + hidden states)"),
    "train": ("specalign.train.train", "train a drafter (any registered type: TokenAdapter, EAGLE-3) on a feature store"),
    "export": ("specalign.train.export", "export a trained checkpoint as a self-describing drafter directory"),
    "evaluate": ("specalign.specdec.evaluate", "measure acceptance (offline simulation or online decoding)"),
    "plot": ("specalign.train.plot", "overlay the curves of several runs"),
    "teach": ("specalign.train.teach", "teach the tiny VLM pair to describe the synthetic world (cached)"),
    "pipeline": ("specalign.train.pipeline", "run every stage on the embedded synthetic world"),
}


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = ["usage: specalign <stage> [hydra overrides] [--help]", "", "stages:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "`specalign <stage> --help` shows the stage's config and its config groups."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"specalign: unknown stage '{stage}'.\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    os.environ["SPECALIGN_STAGE"] = stage
    # argv[0] becomes a real script so that Lightning's DDP launcher can start the other ranks
    # with the same command line; the help template is the project's own
    sys.argv = [str(Path(__file__).parent / "scripts" / "stage_main.py"), *rest, "hydra/help=specalign"]
    run_stage(stage)


def run_stage(stage: str) -> None:
    """Run the stage's Hydra app on the current sys.argv; its module (and torch with it) is imported only after
    the command line has passed the stage's checks, so that a mistyped value fails in a second."""
    from specalign.stage import stage_app

    stage_app(stage, lambda: stage_function(stage))()


def stage_function(stage: str):
    """The plain function `fn(cfg)` behind the stage's `main` (`hydra_stage`)."""
    module_name = STAGES[stage][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"specalign: stage '{stage}' is not available in this version ({module_name} missing).",
                  file=sys.stderr)
            raise SystemExit(2) from None
        raise
    return module.main.run


if __name__ == "__main__":
    main()
