"""Stage `report`: merge every shard of the run directory into RUN/report/.

Reads every table (all part files of all shards, flat or in per-shard folders, whichever
invocation wrote them) through an embedded DuckDB engine that returns aggregates only, so memory
is bounded independently of the run's size (``report.engine_memory_limit``, default 2GB, beyond
which the engine spills to disk; ``report.engine_threads``, default 0 = the machine's cores, at
most 8; both optional keys). Pass flags are derived from the raw scores with this invocation's
``metrics`` thresholds; intervals are patient-level cluster bootstrap intervals. Writes
``report/report.md``, a self-contained ``report/report.html`` (figures as base64 PNG),
``report/token_explorer.html``, ``report/figures/*.png`` and ``report/tables/*.csv`` (see
:mod:`reports.build`). Works on partial runs: a missing or empty table makes its sections say so.
Options: ``report.include_images`` (false: no patient image anywhere), ``report.bootstrap``,
``report.gallery_size``, ``report.seed``, ``report.explorer_samples``, ``report.explorer_image_size``.

The report does not depend on the shard of the invocation: run it once after every shard has
finished (e.g. ``stages=[report] run_dir=RUN`` with the run's configuration).
"""
from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from pipeline.config import ConfigError

log = logging.getLogger(__name__)


def options(cfg: Any):
    """reports.sections.Options from the config, checked (ConfigError names the key)."""
    from reports.sections import Options

    r = cfg.report
    for key in ("bootstrap", "gallery_size", "explorer_samples"):
        if int(r[key]) < 0:
            raise ConfigError(f"report.{key}={r[key]} must be >= 0")
    if int(r.explorer_image_size) < 16:
        raise ConfigError(f"report.explorer_image_size={r.explorer_image_size} must be >= 16 (pixels)")
    threads = cfg.report.engine_threads
    if threads is not None and int(threads) < 0:
        raise ConfigError(f"report.engine_threads={threads} must be >= 0 (0: the machine's cores)")
    return Options(include_images=bool(r.include_images), bootstrap=int(r.bootstrap), gallery_size=int(r.gallery_size),
                   seed=int(r.seed), explorer_samples=int(r.explorer_samples),
                   explorer_image_size=int(r.explorer_image_size), max_pixels=int(cfg.dataset.max_pixels),
                   engine_memory_limit=str(cfg.report.engine_memory_limit),
                   engine_threads=int(threads or 0))


def run(ctx) -> dict[str, Any]:
    from reports.build import write_report

    opts = options(ctx.cfg)
    thresholds = OmegaConf.to_container(ctx.cfg.metrics, resolve=True)
    summary = write_report(ctx.store.root, opts, thresholds=thresholds)
    if summary["failed_sections"]:
        log.error("report: sections that could not be built: %s", summary["failed_sections"])
    log.info("report written to %s (%d figures, %d tables; missing tables: %s)", summary["report"],
             summary["figures"], summary["tables"], ", ".join(summary["missing_tables"]) or "none")
    return summary
