"""Datasets: one class per source, all yielding ImageRecords with the shared finding vocabulary."""
from __future__ import annotations

from typing import Any

from pipeline.datasets.base import Box, CXRDataset, ImageRecord, fingerprint, select, shard_of
from pipeline.datasets.mimic_cxr import DatasetError, MimicCXR


def get_dataset(cfg: Any) -> CXRDataset:
    """The dataset named by `cfg.name` (mimic_cxr, nih_cxr14, manifest, demo)."""
    if cfg.name == "mimic_cxr":
        return MimicCXR(cfg)
    if cfg.name == "nih_cxr14":
        from pipeline.datasets.nih_cxr14 import NIHChestXray14

        return NIHChestXray14(cfg)
    if cfg.name == "manifest":
        from pipeline.datasets.manifest import ManifestDataset

        return ManifestDataset(cfg)
    if cfg.name == "demo":
        from pipeline.datasets.demo import DemoPhantoms

        return DemoPhantoms(cfg)
    raise DatasetError(f"dataset.name={cfg.name!r} is not a known dataset")


__all__ = ["Box", "CXRDataset", "DatasetError", "ImageRecord", "fingerprint", "get_dataset", "select", "shard_of"]
