"""benchmarks/bench_scale.py at a tiny size: synthetic runs, one measurement, the summary line."""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.datasets import shard_of
from pipeline.schemas import TABLES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_scale.py"
SIZES, SHARDS = (64, 128), 4
LINE = re.compile(r"^scale: shard-score ratio (\d+\.\d{2}), shard-resume ratio (\d+\.\d{2}|n/a), "
                  r"report peak GiB (\d+\.\d{2}|n/a) at 128 images$")


def rows(run: Path, name: str) -> list[dict]:
    files = [str(p) for p in (run / name).rglob("part-*.parquet") if not p.name.startswith(".")]
    return ds.dataset(files, schema=TABLES[name].schema, format="parquet").to_table().to_pylist() if files else []


def image_of(row: dict) -> str:
    return row.get("image_id") or row["sample_id"].split(":")[1]


@pytest.mark.slow
def test_tiny_synthetic_runs_and_summary(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", ",".join(map(str, SIZES)), "--shards", str(SHARDS),
         "--measure", "shard-score", "--source-n", "2", "--work", str(tmp_path), "--keep", "--timeout", "300"],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert LINE.match(last), last

    source = tmp_path / "source"
    present = [name for name in TABLES if (source / name).is_dir()]
    assert {"samples", "generations", "relevancy", "metrics"} <= set(present)
    per_image = {name: Counter(image_of(r) for r in rows(source, name)) for name in present}
    src_images = sorted(per_image["samples"])
    shard0_ids = []
    for n in SIZES:
        run = tmp_path / f"syn-{n}-of-{SHARDS}"
        assert (run / "manifest.json").is_file()
        for name in present:
            table = rows(run, name)
            # image ordinal o copies source image o mod m; shard 0 was scored by the measured run
            expected = sum(per_image[name][src_images[o % len(src_images)]] for o in range(n))
            assert len(table) == expected, (n, name)
            assert all(r["shard"] == shard_of(image_of(r), SHARDS) for r in table), (n, name)
        samples = rows(run, "samples")
        assert len({r["image_id"] for r in samples}) == n
        assert all(r["sample_id"] == f"{r['dataset']}:{r['image_id']}:{r['prompt_id']}" for r in samples)
        shard0_ids.append(sorted({r["image_id"] for r in samples if r["shard"] == 0}))
    assert shard0_ids[0] == shard0_ids[1] and len(shard0_ids[0]) == SIZES[0] // SHARDS
