"""Stage `compact`: merge this shard's part files of every table into few large files.

Writers flush a part file every `flush_mb` MiB or `flush_seconds`, and every invocation (a
resume, a requeue) adds its own; a finished shard is compacted to files of up to `compact_mb`
MiB, so a 250,000-image run keeps a few files per shard and table (docs/benchmarks.md, "Scale").
Runs under the shard's lock; see :meth:`pipeline.store.ShardView.compact`.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def run(ctx) -> dict[str, Any]:
    merged = ctx.view.compact(target_mb=float(ctx.cfg.compact_mb))
    if merged:
        log.info("compact: %s", ", ".join(f"{t} {n} parts" for t, n in sorted(merged.items())))
    return {"tables_compacted": len(merged), "parts_merged": sum(merged.values())}
