"""The embedded demo: synthetic phantoms written in the MIMIC-CXR-JPG layout on first use.

The files are generated deterministically from (`dataset.seed`, `dataset.n`) into
`data/demo_cache/seed<seed>_n<n>/` (or `dataset.root`) and read by the MIMIC-CXR loader, so the
demo exercises the same code path as MIMIC-CXR. The phantoms' ground truth also labels findings
the CheXpert columns lack (Nodule).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


from pipeline.datasets.base import ImageRecord
from pipeline.datasets.mimic_cxr import MimicCXR, read_csv

REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def demo_root(seed: int, n: int, root: str | None = None, side_markers: str = "default") -> Path:
    """Where the demo files live; generated there (atomically) if absent."""
    suffix = "" if side_markers == "default" else f"_markers-{side_markers}"
    target = Path(root) if root else REPO_DATA / "demo_cache" / f"seed{seed}_n{n}{suffix}"
    if (target / "phantom_truth.csv").is_file():
        return target
    from pipeline.phantoms import write_demo_dataset

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo_dataset(tmp, n=n, seed=seed, side_markers=side_markers)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first (or a stale empty dir): keep theirs
            if not (target / "phantom_truth.csv").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class DemoPhantoms(MimicCXR):
    name = "demo"

    def __init__(self, cfg):
        super().__init__(cfg, root=demo_root(cfg.seed, cfg.n, cfg.root, cfg.side_markers), name="demo")
        self.truth_file = self.root / "phantom_truth.csv"

    def source_files(self) -> list[Path]:
        return super().source_files() + [self.truth_file]

    def records(self) -> list[ImageRecord]:
        recs = super().records()
        truth = read_csv(self.truth_file, ["dicom_id", "finding"], dtype={"dicom_id": str}, keep_default_na=False)
        nodules = set(truth.loc[truth["finding"] == "Nodule", "dicom_id"])
        for r in recs:
            r.labels["Nodule"] = 1.0 if r.image_id in nodules else 0.0
        return recs
