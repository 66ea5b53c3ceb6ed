"""Runs the configured stages in order over one run directory (one shard)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig
from tqdm import tqdm

from pipeline.config import validate
from pipeline.manifest import InvocationManifest, check_identity
from pipeline.stages import get_stage
from pipeline.store import RunStore

log = logging.getLogger("pipeline")


@dataclass
class RunContext:
    """What a stage gets: the config, the run store, this invocation's manifest and shard."""

    cfg: DictConfig
    store: RunStore
    manifest: InvocationManifest
    shard: int
    cache: dict[str, Any]

    def progress(self, iterable: Iterable, total: int | None, desc: str) -> Iterable:
        return tqdm(iterable, total=total, desc=desc, disable=not self.cfg.progress, dynamic_ncols=True)

    def writer(self, table: str):
        return self.store.writer(table, self.shard, flush_rows=self.cfg.flush_rows)

    def skip_keys(self, table: str, stage: str) -> set[str]:
        """sample_ids a stage must not redo: already written, or (unless retry_errors) failed."""
        done = {k[0] for k in self.store.table(table).keys()}
        if not self.cfg.retry_errors:
            done |= self.store.error_keys(stage)
        return done


def run(cfg: DictConfig) -> RunContext:
    """Validate the config, check the run directory's identity, then run each stage."""
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    store = RunStore(run_dir)
    check_identity(run_dir, cfg)
    manifest = InvocationManifest(run_dir, cfg)
    ctx = RunContext(cfg=cfg, store=store, manifest=manifest, shard=cfg.dataset.shard, cache={})
    log.info("run_dir=%s stages=%s shard=%d/%d", run_dir, list(cfg.stages), cfg.dataset.shard, cfg.dataset.num_shards)
    for name in cfg.stages:
        t0 = time.perf_counter()
        summary = get_stage(name)(ctx) or {}
        seconds = time.perf_counter() - t0
        manifest.stage(name, seconds=round(seconds, 3), **summary)
        log.info("stage %s done in %.1f s: %s", name, seconds, summary)
    manifest.update(finished_utc=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    return ctx
