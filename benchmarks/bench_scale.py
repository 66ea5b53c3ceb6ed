"""Do the non-GPU stages scale to MIMIC-CXR size (250,000 images x 11 prompts, 64-256 shards)?

    python benchmarks/bench_scale.py [--quick | --sizes 2000,8000,16000] [--shards 64]
        [--repo PATH] [--work /tmp/bench_scale] [--timeout 900] [--mem-limit-gib 15] [--keep]

Method.
1. Source: one real demo run, ``run_pipeline.py run_dir=WORK/source dataset.n=8
   metrics.faithfulness=false`` (``faithfulness.enabled=false`` where the config has a
   faithfulness group), made once per --work folder and --repo, then reused: real rows of every
   table. Every measured command repeats these overrides.
2. Synthetic runs: for each size N, N images x the source's prompts spread over --shards shards,
   each image a copy of one source image's rows (every table, generically over
   ``pipeline.schemas.TABLES``) with new ``image_id`` (MIMIC dicom-id style), ``sample_id``,
   ``study_id`` (one study per image), ``subject_id`` (2.5 images per patient) and ``shard`` =
   ``shard_of(image_id, shards)``; maps, paths and sha256 are kept. Rows go through the
   project's own writer (whatever the --repo checkout offers: ``RunStore.shard(...).writer``,
   ``RunStore.writer`` or ``Table.write_rows``) with the default flush size of its config
   (``flush_rows`` or ``flush_mb``; time-based flushes off), flushing at the unit boundaries the
   stages use (an image for samples and metrics, a sample for generations and relevancy, the
   whole shard for sensitivity and answers, one row for errors), so part files have realistic
   sizes and counts (fsync is skipped while building). Where the store offers per-shard
   compaction and the default stages include ``compact``, every finished shard is compacted.
   manifest.json, manifests/ and .hydra are copied from the source; identity keys that the
   measured commands set are rewritten to match, so the commands resume the run unrefused.
3. Comparable shards: the number of shards is fixed, and the measured shard 0 holds the SAME
   images at every size (the first n0 = min(sizes) / shards synthetic ids that hash to shard 0,
   replicating the same source images); only the other shards grow with N. A per-shard stage
   whose cost does not depend on the size of the run therefore shows a ratio of ~1.
   Shard 0 is written without its score tables (metrics, sensitivity, answers), as a shard
   stopped before its score stage.
4. Measurements, each a fresh ``run_pipeline.py`` process (cwd and PYTHONPATH = --repo): wall time
   (seconds, process start to exit, imports included) and peak RSS (GiB = 2^30 bytes, the
   child's ru_maxrss from wait4); RSS is polled to kill a child above --mem-limit-gib.
   - shard-score: ``stages=[score] dataset.num_shards=S dataset.shard=0`` (shard 0's score work);
   - shard-resume: ``stages=[explain,score]`` on shard 0 afterwards (every row present);
   - report: ``stages=[report]`` over the whole run (report options at their defaults).
   Body masks: a store with a body_masks table (written at load) gets them copied like any
   table; an older one caches them per image digest in RUN/cache, computed by score for the
   source's few digests, the same work at every size.
The last line: ``scale: shard-score ratio R1, shard-resume ratio R2, report peak GiB M at N images``
(R = wall time at the largest size / at the smallest; ">" marks a lower bound from a timeout).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
THIS_REPO = Path(__file__).resolve().parents[1]
MEASURES = ("shard-score", "shard-resume", "report")
SCORE_TABLES = ("metrics", "sensitivity", "answers")  # written by the score stage
UNIT = {"samples": "image", "metrics": "image", "sensitivity": "shard", "answers": "shard", "errors": "row"}
QUICK_SIZES = (500, 1000, 4000)
FULL_SIZES = (2000, 8000, 16000)


# --------------------------------------------------------------------------------------------
# synthetic run (runs in a child process, importing the --repo checkout's `pipeline`)
# --------------------------------------------------------------------------------------------

def _read_rows(run_dir: Path, spec) -> list[dict]:
    """Every row of a table folder, whatever its layout (flat or per-shard sub-folders)."""
    import pyarrow.dataset as ds

    files = sorted(str(p) for p in (run_dir / spec.name).rglob("part-*.parquet") if not p.name.startswith("."))
    return ds.dataset(files, schema=spec.schema, format="parquet").to_table().to_pylist() if files else []


def _flush_defaults() -> dict:
    """Default flush settings of the pipeline config (dataclass, then conf/config.yaml)."""
    import yaml

    from pipeline import config

    out = {f.name: f.default for f in dataclasses.fields(config.Config) if f.name.startswith(("flush_", "compact_"))}
    top = yaml.safe_load(Path("conf/config.yaml").read_text()) or {}
    out.update({k: v for k, v in top.items() if k in out})
    if "flush_seconds" in out:
        out["flush_seconds"] = 1e9  # part sizes set by size alone, not by how fast this script is
    return out


def _accepted(fn, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


class _RowsWriter:
    """Fallback: Table.write_rows with a row-count flush (the older stores' PartWriter)."""

    def __init__(self, table, tag: str, flush_rows: int):
        self.table, self.tag, self.flush_rows, self.buffer = table, tag, flush_rows, []

    def add(self, rows):
        self.buffer.extend([rows] if isinstance(rows, dict) else rows)

    def maybe_flush(self):
        if len(self.buffer) >= self.flush_rows:
            self.flush()

    def flush(self):
        if self.buffer:
            self.table.write_rows(self.buffer, self.tag)
        self.buffer = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()


def _writer(store, name: str, shard: int, num_shards: int, flush: dict):
    if hasattr(store, "shard"):  # per-shard views (shard folders)
        return store.shard(shard, num_shards, **_accepted(store.shard, flush)).writer(name)
    if hasattr(store, "writer"):
        return store.writer(name, shard, **_accepted(store.writer, flush))
    return _RowsWriter(store.table(name), f"s{shard:05d}", int(flush.get("flush_rows", 64)))


def synthetic_ids(n: int, shards: int, n0: int, shard_of) -> list[str]:
    """n image ids: the first n0 that hash to shard 0 (the same at every n), then n - n0 others."""
    own, other, i = [], [], 0
    while len(own) < n0 or len(other) < n - n0:
        h = hashlib.sha256(f"bench-scale:{i}".encode()).hexdigest()
        iid = "-".join(h[k:k + 8] for k in range(0, 40, 8))
        if shard_of(iid, shards) == 0:
            if len(own) < n0:
                own.append(iid)
        elif len(other) < n - n0:
            other.append(iid)
        i += 1
    return own + other


def _copy_row(row: dict, src: str, new: str, ordinal: int, shard: int) -> dict:
    out = dict(row)
    if "image_id" in out and out["image_id"] == src:
        out["image_id"] = new
    if isinstance(out.get("sample_id"), str):
        head, sep, tail = out["sample_id"].partition(f":{src}:")
        if sep:
            out["sample_id"] = f"{head}:{new}:{tail}"
    if "study_id" in out:
        out["study_id"] = str(50_000_000 + ordinal)
    if "subject_id" in out:
        out["subject_id"] = str(10_000_000 + ordinal * 2 // 5)
    if "shard" in out:
        out["shard"] = shard
    return out


def _units(name: str, rows: list[dict]) -> list[list[dict]]:
    """A shard's rows of one table cut where the stage that writes it may flush."""
    unit = UNIT.get(name, "sample" if rows and "sample_id" in rows[0] else "image")
    if unit == "shard":
        return [rows] if rows else []
    if unit == "row":
        return [[r] for r in rows]
    key = "sample_id" if unit == "sample" else "image_id"
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get(key) or "", []).append(r)
    return [groups[k] for k in sorted(groups)]


def build(source: Path, dest: Path, n: int, shards: int, n0: int, omit_shard0_score: bool) -> dict:
    """Write the synthetic run `dest`; returns rows and part files per table."""
    from pipeline import config, schemas
    from pipeline import manifest as manifest_mod
    from pipeline.datasets import shard_of
    from pipeline.store import RunStore

    specs = {name: spec for name, spec in schemas.TABLES.items() if (source / name).is_dir()}
    src = {name: _read_rows(source, spec) for name, spec in specs.items()}
    image_of = {r["sample_id"]: r["image_id"] for r in src["samples"]}
    src_images = sorted(set(image_of.values()))
    known = set(src_images)
    by_image: dict[str, dict[str, list[dict]]] = {name: {} for name in specs}
    for name, rows in src.items():
        for r in rows:
            img = r.get("image_id") or image_of.get(r.get("sample_id"))
            if img in known:
                by_image[name].setdefault(img, []).append(r)

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ids = synthetic_ids(n, shards, n0, shard_of)
    per_shard: dict[int, list[tuple[str, str, int]]] = {}
    for ordinal, iid in enumerate(ids):
        per_shard.setdefault(shard_of(iid, shards), []).append((iid, src_images[ordinal % len(src_images)], ordinal))

    store, flush = RunStore(dest), _flush_defaults()
    default_stages = next(f.default_factory() for f in dataclasses.fields(config.Config) if f.name == "stages")
    compact = "compact" in default_stages and hasattr(store, "shard") and hasattr(store.shard(0, shards), "compact")
    written = dict.fromkeys(specs, 0)
    for k in sorted(per_shard):
        images = sorted(per_shard[k])
        for name in specs:
            if k == 0 and omit_shard0_score and name in SCORE_TABLES:
                continue
            rows = [_copy_row(r, s, iid, o, k) for iid, s, o in images for r in by_image[name].get(s, [])]
            written[name] += len(rows)
            with _writer(store, name, k, shards, flush) as w:
                for unit in _units(name, rows):
                    w.add(unit)
                    w.flush() if UNIT.get(name) == "row" else w.maybe_flush()
        if compact and k != 0:
            view = store.shard(k, shards)
            view.compact(**_accepted(view.compact, {"target_mb": flush.get("compact_mb", 256.0)}))

    for item in ("manifests", ".hydra"):
        if (source / item).is_dir():
            shutil.copytree(source / item, dest / item)
    ident = json.loads((source / "manifest.json").read_text())
    overrides = dict(a.split("=", 1) for a in _shard_args(shards, 0))
    for key, value in overrides.items():  # identity keys the measured commands set
        if key in ident.get("identity", {}):
            ident["identity"][key] = json.loads(value)
    if hasattr(manifest_mod, "config_hash") and "config_hash" in ident:
        ident["config_hash"] = manifest_mod.config_hash(ident["identity"])
    (dest / "manifest.json").write_text(json.dumps(ident, indent=2, sort_keys=True))
    return {
        "images": n,
        "shard0_images": len(per_shard.get(0, [])),
        "tables": {name: {"rows": written[name],
                          "parts": sum(1 for p in (dest / name).rglob("part-*.parquet") if not p.name.startswith("."))}
                   for name in specs},
        "compacted": compact,
    }


# --------------------------------------------------------------------------------------------
# driver (imports nothing from the measured checkout)
# --------------------------------------------------------------------------------------------

def _shard_args(shards: int, shard: int) -> list[str]:
    return [f"dataset.num_shards={shards}", f"dataset.shard={shard}"]


def child_env(repo: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@dataclasses.dataclass
class Result:
    seconds: float | None = None  # wall time; None: did not finish
    peak_gib: float | None = None
    status: str = "ok"  # ok | timeout | killed above X GiB | failed (rc=N) | skipped
    tail: str = ""
    stage_seconds: float | None = None  # the stages' own time (the pipeline's log), without start-up

    def cell(self, timeout: float) -> str:
        if self.status == "ok":
            return f"{self.seconds:8.2f} s {self.peak_gib:6.2f} GiB"
        if self.status == "timeout":
            return f"{'>' + format(timeout, '.0f') + ' s':>10} {self.peak_gib or 0:6.2f} GiB"
        return f"{self.status:>21}"


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], repo: Path, timeout: float, mem_limit_gib: float, log: Path) -> Result:
    """Run `cmd` in a fresh process; wall seconds and peak RSS, or why it did not finish."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=child_env(repo), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        status, seen = "ok", 0
        while True:
            pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            seen = max(seen, _rss_bytes(proc.pid))
            if time.monotonic() - t0 > timeout:
                status = "timeout"
            elif seen > mem_limit_gib * GIB:
                status = f"killed above {mem_limit_gib:g} GiB"
            if status != "ok":
                os.killpg(proc.pid, signal.SIGKILL)
                pid, wstatus, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    seconds = time.monotonic() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(wstatus)
    peak = max(usage.ru_maxrss * 1024, seen) / GIB
    text = log.read_text(errors="replace")
    stages = [float(x) for x in re.findall(r"stage \w+ done in ([0-9.]+) s", text)]
    if status == "ok" and rc != 0:
        status = f"failed (rc={rc})"
    return Result(seconds if status == "ok" else None, peak, status, "\n".join(text.splitlines()[-15:]),
                  sum(stages) if stages else None)


def source_overrides(repo: Path, source_n: int) -> list[str]:
    """dataset.n and faithfulness off, under the key the checkout's config has."""
    probe = ("import dataclasses; from pipeline import config; "
             "print('faithfulness' in {f.name for f in dataclasses.fields(config.Config)})")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=repo, env=child_env(repo), capture_output=True,
                          text=True, check=True)
    grouped = proc.stdout.strip() == "True"
    return [f"dataset.n={source_n}", "faithfulness.enabled=false" if grouped else "metrics.faithfulness=false"]


def ensure_source(repo: Path, work: Path, overrides: list[str]) -> Path:
    """The real demo run (reused when made by the same checkout with the same options)."""
    source, marker = work / "source", work / "source.json"
    want = {"repo": str(repo), "overrides": overrides}
    if marker.is_file() and json.loads(marker.read_text()) == want and (source / "samples").is_dir():
        return source
    shutil.rmtree(source, ignore_errors=True)
    marker.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "run_pipeline.py", f"run_dir={source}", *overrides, "progress=false"]
    print("source run:", " ".join(cmd[1:]), flush=True)
    res = measure(cmd, repo, 1800, 20, work / "source.log")
    if res.status != "ok":
        sys.exit(f"the source run failed ({res.status}); see {work / 'source.log'}:\n{res.tail}")
    marker.write_text(json.dumps(want))
    return source


def build_in_child(repo: Path, source: Path, dest: Path, n: int, shards: int, n0: int, omit: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_build", str(source), str(dest), str(n), str(shards),
           str(n0), str(int(omit))]
    proc = subprocess.run(cmd, cwd=repo, env=child_env(repo), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"building {dest} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def commands(run: Path, shards: int, overrides: list[str]) -> dict[str, list[str]]:
    base = [sys.executable, "run_pipeline.py", f"run_dir={run}", *overrides, "progress=false"]
    return {
        "shard-score": [*base, "stages=[score]", *_shard_args(shards, 0)],
        "shard-resume": [*base, "stages=[explain,score]", *_shard_args(shards, 0)],
        "report": [*base, "stages=[report]"],
    }


def ratio(small: Result, large: Result, timeout: float) -> str:
    if small.status != "ok" or large.status not in ("ok", "timeout"):
        return "n/a"
    if large.status == "timeout":
        return f">{timeout / small.seconds:.2f}"
    return f"{large.seconds / small.seconds:.2f}"


def print_tables(built: list[dict], results: list[dict[str, Result]], measures: list[str], timeout: float) -> None:
    names = list(built[0]["tables"])
    print("\nrun directories as built (shard 0 without its score tables): rows / part files per table")
    print(f"{'table':<14}" + "".join(f"{str(b['images']) + ' images':>26}" for b in built))
    for name in names:
        print(f"{name:<14}" + "".join(f"{b['tables'][name]['rows']:>14} / {b['tables'][name]['parts']:<9}"
                                      for b in built))
    print(f"{'shard 0 images':<14}" + "".join(f"{b['shard0_images']:>14}{'':12}" for b in built))
    print("\nmeasurements: wall seconds, peak RSS GiB")
    print(f"{'images':>8}  " + "".join(f"{m:>24}" for m in measures))
    for b, res in zip(built, results):
        print(f"{b['images']:>8}  " + "".join(f"{res[m].cell(timeout):>24}" for m in measures))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}: about 8 CPU-minutes on the older store")
    ap.add_argument("--sizes", help=f"comma-separated image counts (default {FULL_SIZES})")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--shard-images", type=int, help="images of the measured shard 0 (default min(sizes) / shards)")
    ap.add_argument("--measure", default=",".join(MEASURES), help="comma-separated subset of " + ", ".join(MEASURES))
    ap.add_argument("--repo", type=Path, default=THIS_REPO, help="checkout whose run_pipeline.py and pipeline are run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--source-n", type=int, default=8, help="dataset.n of the source demo run")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--mem-limit-gib", type=float, default=15.0)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic run directories")
    args = ap.parse_args(argv)
    default = QUICK_SIZES if args.quick else FULL_SIZES
    sizes = sorted(int(s) for s in args.sizes.split(",")) if args.sizes else list(default)
    measures = [m for m in MEASURES if m in args.measure.split(",")]
    repo, work = args.repo.resolve(), args.work.resolve()
    n0 = args.shard_images or max(1, sizes[0] // args.shards)
    print(f"repo {repo}; sizes {sizes} images; {args.shards} shards; shard 0 holds {n0} images at every size")

    overrides = source_overrides(repo, args.source_n)
    source = ensure_source(repo, work, overrides)
    built, results = [], []
    for n in sizes:
        run = work / f"syn-{n}-of-{args.shards}"
        t0 = time.monotonic()
        built.append(build_in_child(repo, source, run, n, args.shards, n0, "shard-score" in measures))
        print(f"built {run} in {time.monotonic() - t0:.1f} s", flush=True)
        res: dict[str, Result] = {}
        for m, cmd in commands(run, args.shards, overrides).items():
            if m not in measures:
                continue
            if m == "shard-resume" and res.get("shard-score", Result()).status != "ok":
                res[m] = Result(status="skipped")
                continue
            res[m] = measure(cmd, repo, args.timeout, args.mem_limit_gib, work / f"{run.name}.{m}.log")
            staged = "" if res[m].stage_seconds is None else f" (stages {res[m].stage_seconds:.1f} s)"
            print(f"  {m:<13} {res[m].cell(args.timeout)}{staged}   {' '.join(cmd[1:])}", flush=True)
            if res[m].status != "ok":
                print("    " + res[m].tail.replace("\n", "\n    "), flush=True)
        results.append(res)
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)

    print_tables(built, results, measures, args.timeout)
    first, last = results[0], results[-1]
    r1 = ratio(first["shard-score"], last["shard-score"], args.timeout) if "shard-score" in measures else "n/a"
    r2 = ratio(first["shard-resume"], last["shard-resume"], args.timeout) if "shard-resume" in measures else "n/a"
    rep = last.get("report")
    peak = "n/a" if rep is None or rep.peak_gib is None else (
        f"{rep.peak_gib:.2f}" if rep.status == "ok" else f">{rep.peak_gib:.2f}")
    print(f"\nscale: shard-score ratio {r1}, shard-resume ratio {r2}, report peak GiB {peak} at {sizes[-1]} images")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_build"]:
        src_dir, dst_dir, n_img, n_shards, n_own, omit = sys.argv[2:8]
        sys.path.insert(0, os.getcwd())
        os.fsync = lambda fd: None  # the same files, written faster: durability is not what is measured
        print(json.dumps(build(Path(src_dir), Path(dst_dir), int(n_img), int(n_shards), int(n_own), omit == "1")))
    else:
        sys.exit(main())
