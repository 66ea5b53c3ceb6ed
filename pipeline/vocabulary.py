"""One finding vocabulary shared by every dataset.

CheXpert's 14 observation names form the core (MIMIC-CXR's labeler columns use them verbatim);
other sources' findings extend it (NIH ChestX-ray14's Mass, Nodule, Infiltration, ...). Each
source's own spelling is mapped to the shared name by `canonical_finding`.

Label states are kept apart everywhere: 1.0 positive, 0.0 negative, -1.0 uncertain and
missing (None / NaN) for "not mentioned".
"""
from __future__ import annotations

import math
import re

CHEXPERT_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

EXTRA_FINDINGS: tuple[str, ...] = (
    "Nodule",
    "Mass",
    "Infiltration",
    "Emphysema",
    "Fibrosis",
    "Pleural Thickening",
    "Hernia",
)

FINDINGS: tuple[str, ...] = CHEXPERT_FINDINGS + EXTRA_FINDINGS

# Source spellings that differ from the shared name (matched case-insensitively).
_ALIASES: dict[str, str] = {
    "effusion": "Pleural Effusion",
    "infiltrate": "Infiltration",
    "infiltrates": "Infiltration",
    "pleural_thickening": "Pleural Thickening",
    "pleural thickening": "Pleural Thickening",
    "opacity": "Lung Opacity",
    "nodules": "Nodule",
    "no findings": "No Finding",
    "normal": "No Finding",
    "support device": "Support Devices",
}

_BY_LOWER: dict[str, str] = {name.lower(): name for name in FINDINGS}


def canonical_finding(name: str) -> str:
    """Map a source's finding spelling to the shared vocabulary name.

    Raises KeyError (naming the spelling) for a finding outside the vocabulary.
    """
    key = re.sub(r"\s+", " ", str(name).strip().replace("_", " ")).lower()
    if key in _BY_LOWER:
        return _BY_LOWER[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f"unknown finding name {name!r}; known: {', '.join(FINDINGS)}")


def label_column(finding: str) -> str:
    """Samples-table column holding a finding's label: 'Pleural Effusion' -> 'label_pleural_effusion'."""
    return "label_" + re.sub(r"[^a-z0-9]+", "_", canonical_finding(finding).lower()).strip("_")


LABEL_COLUMNS: tuple[str, ...] = tuple(label_column(f) for f in FINDINGS)


def label_state(value: object) -> float | None:
    """Normalise a label value: 1.0, 0.0, -1.0, or None for not mentioned (None, a NaN number,
    or blank text). Text must be blank or a number equal to 1, 0 or -1 ("1", "1.0", "-1");
    anything else ("2", "1.5", "yes", "nan" text, ...) raises ValueError naming the value."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            if not value.strip():
                return None
            v = float(value.strip())
        else:
            v = float(value)  # type: ignore[arg-type]
            if math.isnan(v):
                return None
    except (TypeError, ValueError):
        v = math.nan
    if v not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {value!r} is not one of 1, 0, -1 or blank")
    return v
