"""Runs the configured stages in order over one run directory (one shard)."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow.dataset as ds
from omegaconf import DictConfig
from tqdm import tqdm

from pipeline.config import validate
from pipeline.locks import report_lock, run_lock, shard_lock
from pipeline.manifest import InvocationManifest, check_identity, refuse_changed_identity
from pipeline.stages import get_stage
from pipeline.store import PartWriter, RunStore, ShardView

log = logging.getLogger("pipeline")


@dataclass
class RunContext:
    """What a stage gets: the config, the run store, this shard's view of it, this invocation's
    manifest and shard."""

    cfg: DictConfig
    store: RunStore
    view: ShardView
    manifest: InvocationManifest
    shard: int
    cache: dict[str, Any]

    def progress(self, iterable: Iterable, total: int | None, desc: str) -> Iterable:
        return tqdm(iterable, total=total, desc=desc, disable=not self.cfg.progress, dynamic_ncols=True)

    def writer(self, table: str) -> PartWriter:
        return self.view.writer(table)

    def record_error(self, stage: str, sample_id: str, exc: BaseException, *, image_id: str = "",
                     detail: str = "") -> None:
        self.view.record_error(stage, sample_id, exc, image_id=image_id, detail=detail)

    def skip_keys(self, table: str, stage: str, sample_ids: Iterable[str]) -> set[str]:
        """sample_ids of this shard a stage must not redo: already written, or (unless
        retry_errors) failed. `sample_ids`: this shard's samples (restricts foreign parts)."""
        only = ds.field("sample_id").isin(sorted(set(sample_ids)))
        done = {k[0] for k in self.view.keys(table, foreign_filter=only)}
        if not self.cfg.retry_errors:
            done |= self.view.error_keys(stage, foreign_filter=only)
        return done


def _locks(cfg: DictConfig, run_dir: Path) -> ExitStack:
    """The shard's lock when a shard stage runs, the report's when the report runs."""
    stack = ExitStack()
    if set(cfg.stages) - {"report"}:
        stack.enter_context(shard_lock(run_dir, cfg.dataset.shard, cfg.dataset.num_shards, cfg.lock_timeout))
    if "report" in cfg.stages:
        stack.enter_context(report_lock(run_dir, cfg.lock_timeout))
    return stack


@contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """Copy the log records of this invocation into `path` for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run(cfg: DictConfig) -> RunContext:
    """Validate the config, check the run directory's identity (a refused config writes nothing
    into it), then run each stage under the shard's lock, logging into RUN/logs/."""
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    refuse_changed_identity(run_dir, cfg)
    store = RunStore(run_dir)
    with _locks(cfg, run_dir), ExitStack() as logging_to_file:
        with run_lock(run_dir):
            check_identity(run_dir, cfg)
            manifest = InvocationManifest(run_dir, cfg)
        logging_to_file.enter_context(_log_file(run_dir / "logs" / manifest.path.with_suffix(".log").name))
        d = cfg.dataset
        view = store.shard(d.shard, d.num_shards, flush_mb=cfg.flush_mb, flush_seconds=cfg.flush_seconds)
        ctx = RunContext(cfg=cfg, store=store, view=view, manifest=manifest, shard=d.shard, cache={})
        log.info("run_dir=%s stages=%s shard=%d/%d", run_dir, list(cfg.stages), d.shard, d.num_shards)
        for name in cfg.stages:
            t0 = time.perf_counter()
            summary = get_stage(name)(ctx) or {}
            seconds = time.perf_counter() - t0
            manifest.stage(name, seconds=round(seconds, 3), **summary)
            log.info("stage %s done in %.1f s: %s", name, seconds, summary)
        manifest.update(finished_utc=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    return ctx
