"""What every dataset yields, and the selection (filters, limit, shard) shared by all of them."""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.vocabulary import canonical_finding


@dataclass(frozen=True)
class Box:
    """A ground-truth box: x, y (top-left), w, h in pixels of a reference size.

    `ref_width` / `ref_height` give the pixel space the box was drawn in (MS-CXR: the DICOM's);
    None means the stored image's own pixel space. `scaled_to` maps it onto the decoded image.
    """

    finding: str
    x: float
    y: float
    w: float
    h: float
    ref_width: float | None = None
    ref_height: float | None = None
    origin: str = ""  # where it was read, e.g. "BBox_List_2017.csv row 12" (named in error rows)

    def scaled_to(self, width: int, height: int) -> dict[str, Any]:
        sx = width / self.ref_width if self.ref_width else 1.0
        sy = height / self.ref_height if self.ref_height else 1.0
        return {"finding": self.finding, "x": self.x * sx, "y": self.y * sy, "w": self.w * sx, "h": self.h * sy}


@dataclass
class ImageRecord:
    """One image of a dataset with its metadata, labels and boxes (before prompts are attached)."""

    dataset: str
    image_id: str
    image_path: str
    study_id: str = ""
    subject_id: str = ""
    view_position: str = ""  # upper case; "" when unknown
    split: str = ""
    labels: dict[str, float | None] = field(default_factory=dict)  # vocabulary name -> state
    boxes: list[Box] = field(default_factory=list)
    report_text: str | None = None
    prompt_text: str | None = None  # a per-image prompt (manifest datasets)
    lung_mask_path: str | None = None
    # What was wrong in the dataset files about this image, each naming the file and row:
    # `error` rejects the image (an errors/ row of stage "load"; it is not loaded); `problems` are
    # recorded (errors/ rows of stage "dataset") while the image is loaded, e.g. a dropped box.
    error: str | None = None
    problems: list[str] = field(default_factory=list)


class CXRDataset(ABC):
    """A source of chest X-ray images. Subclasses parse their own files into ImageRecords."""

    name: str = ""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abstractmethod
    def records(self) -> list[ImageRecord]:
        """Every image of the source (unfiltered), in a deterministic order."""

    @abstractmethod
    def source_files(self) -> list[Path]:
        """The metadata/label files whose content defines the dataset (for the fingerprint)."""


def shard_of(image_id: str, num_shards: int) -> int:
    """Deterministic shard of an image: a hash of its id (stable across machines and runs)."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def _normalise_view(view: str) -> str:
    return " ".join(str(view or "").upper().split())


def select(records: list[ImageRecord], cfg: Any, *, apply_shard: bool = True) -> list[ImageRecord]:
    """Apply the filters, then the limit, then the shard, to records sorted by image id.

    The limit comes before sharding, so the shards of a limited run together hold exactly the
    images of the unsharded limited run.
    """
    views = {_normalise_view(v) for v in cfg.views}
    splits = {str(s).lower() for s in cfg.splits}
    findings = {canonical_finding(f) for f in cfg.findings}
    out = sorted(records, key=lambda r: r.image_id)
    if views:
        out = [r for r in out if _normalise_view(r.view_position) in views]
    if splits:
        out = [r for r in out if r.split.lower() in splits]
    if findings:
        out = [r for r in out if any(r.labels.get(f) == 1.0 for f in findings)]
    if cfg.one_image_per_study:
        out = _one_per_study(out)
    if cfg.limit is not None:
        out = out[: cfg.limit]
    if apply_shard and cfg.num_shards > 1:
        out = [r for r in out if shard_of(r.image_id, cfg.num_shards) == cfg.shard]
    return out


_VIEW_PRIORITY = {"PA": 0, "AP": 1}


def _one_per_study(records: list[ImageRecord]) -> list[ImageRecord]:
    """Keep one image per study: PA before AP before others, then the smallest image id."""
    best: dict[tuple[str, str], ImageRecord] = {}
    for r in records:
        key = (r.subject_id, r.study_id or r.image_id)
        cur = best.get(key)
        rank = (_VIEW_PRIORITY.get(r.view_position, 9), r.image_id)
        if cur is None or rank < (_VIEW_PRIORITY.get(cur.view_position, 9), cur.image_id):
            best[key] = r
    keep = {id(r) for r in best.values()}
    return [r for r in records if id(r) in keep]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(dataset: CXRDataset, selected: list[ImageRecord]) -> dict[str, Any]:
    """A dataset fingerprint: hashes of its source files and of the selected image ids."""
    files = {str(p): file_sha256(p) for p in dataset.source_files() if Path(p).is_file()}
    ids = hashlib.sha256("\n".join(r.image_id for r in selected).encode()).hexdigest()
    overall = hashlib.sha256((repr(sorted(files.values())) + ids).encode()).hexdigest()
    return {"name": dataset.name, "source_files": files, "selected_images": len(selected),
            "selected_ids_sha256": ids, "sha256": overall}
