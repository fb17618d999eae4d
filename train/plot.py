"""`specalign plot runs=[RUN,...] out=PNG`: overlay the curves of several runs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from specalign.train.curves import collect_metrics, load_metrics, plot_runs

from specalign.io import claim_file
from specalign.stage import hydra_stage


def metrics_of(run: Path):
    csv = run / "metrics.csv"
    return load_metrics(csv if csv.exists() or not (run / "logs").exists() else collect_metrics(run))


@hydra_stage("plot")
def main(cfg: DictConfig) -> None:
    claim_file(cfg.out, "plot")
    print(plot_runs({str(r): metrics_of(Path(r)) for r in cfg.runs}, cfg.out))


if __name__ == "__main__":
    main()
