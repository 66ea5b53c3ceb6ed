"""Entry point: python run_pipeline.py [overrides]   (-m for sweeps). See README.md."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import run

    run(cfg)


if __name__ == "__main__":
    main()
