"""Script form of one stage: `python stage_main.py [overrides]` with SPECALIGN_STAGE set.

It lives in a folder of its own because a script's folder goes first on sys.path.

`specalign <stage>` runs through this file so that processes started again with the same
command line (Lightning's DDP launcher does so for ranks > 0) run the same stage.
"""

import os
import sys

from specalign.cli import STAGES, run_stage

if __name__ == "__main__":
    stage = os.environ.get("SPECALIGN_STAGE")
    if stage not in STAGES:
        sys.exit("stage_main.py: set SPECALIGN_STAGE to a stage name (use the `specalign` command instead)")
    run_stage(stage)
