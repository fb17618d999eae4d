"""`specalign synth out=DIR clips=N seed=S`: write the synthetic world (data/synth.py) to DIR."""

from __future__ import annotations

import dataclasses
import os

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from specalign.data.synth import WorldConfig, synthesize

from specalign.io import claim_output
from specalign.stage import hydra_stage


@hydra_stage("synth")
def main(cfg) -> None:
    world = WorldConfig(**{f.name: cfg[f.name] for f in dataclasses.fields(WorldConfig)})
    durations = [str(d) for d in cfg.durations]
    # a rerun with more or fewer clips rewrites its own world; another seed, sensor or durations is another world
    claim_output(cfg.out, "synth", {**dataclasses.asdict(world), "seed": cfg.seed, "durations": durations})
    workers = cfg.workers or len(os.sched_getaffinity(0))
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("clips", total=cfg.clips * len(durations))
        roots = synthesize(cfg.out, cfg.clips, cfg.seed, durations, world, workers=workers,
                           on_clip=lambda: progress.advance(task))
    for duration, root in roots.items():
        print(f"wrote {cfg.clips} clips of {duration} to {root}")
