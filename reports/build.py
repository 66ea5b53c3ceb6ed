"""Writing the report directory of a run: report.md, report.html, token_explorer.html, figures/, tables/.

::

    RUN/report/report.md            Markdown (figures and CSVs by relative path)
    RUN/report/report.html          self-contained: figures as base64 PNG, no external resource
    RUN/report/token_explorer.html  self-contained: click a word of an answer to see its map
    RUN/report/figures/*.png        every figure of the report
    RUN/report/tables/*.csv         every table in full, raw numbers

The report is assembled in a temporary folder beside ``report/`` and swapped in at the end, so a
re-run (e.g. with ``report.include_images=false``) never leaves files of an earlier report behind,
and a reader never sees half a report. The tables are read through the engine of
:mod:`reports.data` (aggregates only; memory bounded by ``report`` engine settings, not by the
run's size); pass flags are derived with the thresholds in force. Usable outside the pipeline::

    python -m reports.build RUN_DIR [--no-images]
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable


import pandas as pd

from reports import sections as S
from reports.data import EngineSettings, RunData, answer_token_samples, load_run
from reports.document import Figure, Link, Note, Section, Table, to_html, to_markdown
from reports.summary import diagnostics_section, summary_section

log = logging.getLogger(__name__)


def explorer_section(data: RunData, opts: S.Options, out_dir: Path) -> tuple[Section, dict[str, Any]]:
    """Write token_explorer.html (when answer_tokens targets exist) and the section linking it."""
    from reports import explorer as E

    sec = Section("explorer", "Token explorer")
    info: dict[str, Any] = {"explorer_samples": 0}
    if not data.has("relevancy"):
        return sec.add(S.missing_note(data, "relevancy", "no token explorer")), info
    ids = E.choose_samples(data, opts.explorer_samples, opts.seed)
    if not ids:
        n_all = data.scalar("SELECT count(*) FROM relevancy WHERE target_kind = 'answer_tokens' AND status = 'ok'")
        why = ("`report.explorer_samples=0`" if n_all else
               "no target of kind `answer_tokens` was explained (add it with `explain.targets=[...,answer_tokens]`)")
        return sec.add(Note(f"No token explorer: {why}.")), info
    maps = data.relevancy_maps(ids)
    model = data.model
    cfg_model = (data.config("explain") or data.config()).get("model") or {}
    tokenizer = E.load_tokenizer(model, cfg_model)
    image_token_id = model.get("image_token_id")
    payload = E.build_payload(maps, data.rows_where("generations", "sample_id", ids),
                              data.rows_where("samples", "sample_id", ids), ids, tokenizer,
                              None if image_token_id is None else int(image_token_id), opts.include_images,
                              opts.explorer_image_size, opts.max_pixels)
    subtitle = f"{model.get('name_or_path') or 'model ?'} · run {data.root.name} · {len(payload['samples'])} samples"
    page = E.render_page(payload, "Token explorer", subtitle)
    (out_dir / "token_explorer.html").write_text(page, encoding="utf-8")
    n_total = answer_token_samples(data)
    sec.add(Link("Open the token explorer", "token_explorer.html",
                 f"{len(payload['samples'])} of {n_total} samples explained token by token "
                 f"(`report.explorer_samples={opts.explorer_samples}`); click a word of an answer to see its map "
                 "and its relevancy over the prompt."))
    if tokenizer is None:
        sec.add(Note("The model's tokenizer is not available locally: prompts are shown as text, without shading."))
    if not opts.include_images:
        sec.add(Note("`report.include_images=false`: the explorer shows bare map grids, no patient image."))
    info.update(explorer_samples=len(payload["samples"]), explorer_tokenizer=tokenizer is not None,
                explorer_bytes=len(page.encode("utf-8")))
    return sec, info


def _safe(name: str, fn: Callable[[], Section], failed: list[str]) -> Section:
    """Build one section; a failure becomes a note in that section (the rest of the report stands)."""
    try:
        return fn()
    except Exception as e:
        log.error("report: section %s failed:\n%s", name, traceback.format_exc())
        failed.append(name)
        return Section(name, name.replace("_", " ").capitalize(),
                       [Note(f"This section could not be built: {type(e).__name__}: {e}")])


def _swap_in(tmp: Path, final: Path, attempts: int = 5) -> None:
    """Replace the directory `final` by `tmp` (two renames; retried if another writer races us)."""
    for attempt in range(attempts):
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        try:
            try:
                os.replace(final, old)
            except FileNotFoundError:
                pass
            os.replace(tmp, final)
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return


def _title(data: RunData) -> str:
    model = data.model.get("name_or_path") or (data.run_manifest.get("identity") or {}).get("model.name_or_path")
    if model and (str(model).startswith(("/", ".", "~")) or Path(str(model)).exists()):
        model = Path(str(model)).name  # a local directory: its name (the full path is in the identity table)
    ds = (data.run_manifest.get("identity") or {}).get("dataset.name")
    return "Relevancy report" + (f": {model}" if model else "") + (f" on {ds}" if ds else "")


def _sections(data: RunData, opts: S.Options, generated: str, tmp: Path, failed: list[str],
              info: dict[str, Any]) -> list[Section]:
    """The report's sections in reading order: the summary first (built last, from the detail
    sections' per-method tables), the details, then counts, model card and run identity."""
    def _explorer() -> Section:
        sec, i = explorer_section(data, opts, tmp)
        info.update(i)
        return sec

    results: dict[str, pd.DataFrame] = {}

    def _with_table(name: str, fn: Callable[[], tuple[Section, pd.DataFrame]]) -> Callable[[], Section]:
        def build() -> Section:
            sec, results[name] = fn()
            return sec
        return build

    details = [
        _safe("answers", lambda: S.answers_section(data, opts), failed),
        _safe("localisation", _with_table("localisation", lambda: S.localisation_section(data, opts)), failed),
        _safe("faithfulness", _with_table("faithfulness", lambda: S.faithfulness_section(data, opts)), failed),
        _safe("diagnostics", _with_table("diagnostics", lambda: diagnostics_section(data, opts)), failed),
        _safe("laterality", lambda: S.laterality_section(data, opts), failed),
        _safe("sensitivity", lambda: S.sensitivity_section(data, opts), failed),
        _safe("scores", lambda: S.scores_section(data, opts), failed),
        _safe("gallery", lambda: S.gallery_section(data, opts), failed),
        _safe("explorer", _explorer, failed),
        _safe("counts", lambda: S.counts_section(data), failed),
        *([_safe("model_validation", lambda: S.model_validation_section(data), failed)]
          if data.model.get("validation") else []),
        _safe("identity", lambda: S.identity_section(data, generated), failed),
    ]
    empty = pd.DataFrame()
    summary = _safe("summary", lambda: summary_section(data, opts, results.get("localisation", empty),
                                                        results.get("faithfulness", empty),
                                                        results.get("diagnostics", empty)), failed)
    return [summary, *details]


def _write_files(sections: list[Section], tmp: Path) -> tuple[int, int]:
    """figures/*.png and tables/*.csv of every block; returns (figures, tables)."""
    n_fig = n_tab = 0
    names: set[tuple[str, str]] = set()  # (kind, name): figures/NAME.png, tables/NAME.csv
    for sec in sections:
        for b in sec.blocks:
            if isinstance(b, (Figure, Table)):
                key = (type(b).__name__, b.name)
                if key in names:
                    raise ValueError(f"duplicate report file name {b.name!r}")
                names.add(key)
            if isinstance(b, Figure):
                (tmp / "figures" / f"{b.name}.png").write_bytes(b.png)
                n_fig += 1
            elif isinstance(b, Table):
                b.csv_frame.to_csv(tmp / "tables" / f"{b.name}.csv", index=False)
                n_tab += 1
    return n_fig, n_tab


def write_report(run_dir: str | os.PathLike, opts: S.Options, thresholds: dict[str, Any] | None = None,
                 out_name: str = "report") -> dict[str, Any]:
    """Build the whole report of `run_dir` into `run_dir/out_name`; returns a summary dict.

    `thresholds`: the metrics config in force (pass flags are derived with it); None: the
    scoring run's metrics config from its manifest, else the defaults."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    settings = EngineSettings(memory_limit=opts.engine_memory_limit, threads=opts.engine_threads)
    with load_run(run_dir, thresholds=thresholds, settings=settings) as data:
        final = run_dir / out_name
        tmp = run_dir / f".{out_name}.tmp-{os.getpid()}-{time.time_ns()}"
        (tmp / "figures").mkdir(parents=True)
        (tmp / "tables").mkdir()
        try:
            generated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            failed: list[str] = []
            info: dict[str, Any] = {}
            sections = _sections(data, opts, generated, tmp, failed, info)
            title = _title(data)
            intro = (f"Run directory `{run_dir}`; all shards merged. Generated {generated}. "
                     + ("Patient images are left out (`report.include_images=false`)."
                        if not opts.include_images else "Contains patient images (gallery, token explorer)."))
            n_fig, n_tab = _write_files(sections, tmp)
            footer = "cxr-relevancy report · tables in tables/*.csv · figures in figures/*.png"
            (tmp / "report.md").write_text(to_markdown(title, sections, intro), encoding="utf-8")
            (tmp / "report.html").write_text(to_html(title, sections, intro, footer), encoding="utf-8")
            _swap_in(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        missing = [n for n in ("samples", "generations", "relevancy", "metrics", "sensitivity", "answers",
                               "faithfulness") if not data.has(n)]
    return {"report": str(final / "report.html"), "sections": len(sections), "figures": n_fig, "tables": n_tab,
            "gallery": sum(1 for s in sections if s.id == "gallery" for b in s.blocks if isinstance(b, Figure)),
            "missing_tables": missing, "failed_sections": failed, **info,
            "build_seconds": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write RUN_DIR/report from a run directory's tables.")
    ap.add_argument("run_dir")
    ap.add_argument("--no-images", action="store_true", help="leave every patient image out")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--gallery-size", type=int, default=8)
    ap.add_argument("--explorer-samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit (it spills beyond)")
    ap.add_argument("--threads", type=int, default=0, help="DuckDB threads (0: the machine's cores, at most 8)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = write_report(a.run_dir, S.Options(include_images=not a.no_images, bootstrap=a.bootstrap,
                                            gallery_size=a.gallery_size, explorer_samples=a.explorer_samples,
                                            seed=a.seed, engine_memory_limit=a.memory_limit,
                                            engine_threads=a.threads))
    print(out)


if __name__ == "__main__":
    main()
