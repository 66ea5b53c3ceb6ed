"""Published localisation results of other models, shown beside the run's own numbers.

They are other models on other data (MS-CXR on MIMIC-CXR, the CheXpert test set), each with its
own protocol; the report labels them as such. A number here is a fact with its source: the
published model card or paper that prints it. The two model cards print BioViL's CNR from
different evaluations (1.07 on BioViL-T's card, 1.027 on CXR-BERT's); each number here keeps
its own source and BioViL's is taken from the card that also prints its mIoU.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from reports.document import Paragraph, Table


@dataclass(frozen=True)
class Published:
    """One published number: `metric` of `model` on `dataset`, from `source`; `value` as printed
    there (its digits are the source's precision)."""

    metric: str
    value: str
    model: str
    dataset: str
    protocol: str
    source: str


_BIOVIL_T_CARD = "BioViL-T model card, 'Performance' (huggingface.co/microsoft/BiomedVLP-BioViL-T); Bannur et al., CVPR 2023"
_CXR_BERT_CARD = ("CXR-BERT-specialized model card, 'Performance' (huggingface.co/microsoft/BiomedVLP-CXR-BERT-specialized); "
                  "Boecking et al., ECCV 2022")
_MS_CXR = "MS-CXR (MIMIC-CXR), phrase grounding"
_SIMILARITY = "patch-text similarity map, average over the MS-CXR classes"

PUBLISHED: tuple[Published, ...] = (
    Published("CNR", "1.33", "BioViL-T", _MS_CXR, _SIMILARITY + " (± 0.04)", _BIOVIL_T_CARD),
    Published("mIoU", "0.240", "BioViL-T", _MS_CXR, _SIMILARITY + " (± 0.005)", _BIOVIL_T_CARD),
    Published("CNR", "1.07", "BioViL", _MS_CXR, _SIMILARITY + " (± 0.04)", _BIOVIL_T_CARD),
    Published("mIoU", "0.229", "BioViL", _MS_CXR, _SIMILARITY + " (± 0.005)", _BIOVIL_T_CARD),
    Published("CNR", "1.21", "BioViL-L", _MS_CXR, _SIMILARITY + " (± 0.05)", _BIOVIL_T_CARD),
    Published("mIoU", "0.202", "BioViL-L", _MS_CXR, _SIMILARITY + " (± 0.010)", _BIOVIL_T_CARD),
    Published("CNR", "0.930", "GLoRIA", _MS_CXR, _SIMILARITY + ", zero-shot", _CXR_BERT_CARD),
    Published("CNR", "0.818", "ConVIRT", _MS_CXR, _SIMILARITY + ", zero-shot", _CXR_BERT_CARD),
)


def literature_table() -> pd.DataFrame:
    """The published values as a table (one row per number)."""
    return pd.DataFrame([{"metric": p.metric, "value": p.value, "model (not this run's)": p.model,
                          "dataset": p.dataset, "protocol": p.protocol, "source": p.source} for p in PUBLISHED],
                        columns=["metric", "value", "model (not this run's)", "dataset", "protocol", "source"])


def headline() -> str:
    """One sentence with the best-known published numbers (for the summary), or ''."""
    vals = {(p.model, p.metric): p.value for p in PUBLISHED}
    if ("BioViL-T", "CNR") not in vals or ("BioViL-T", "mIoU") not in vals:
        return ""
    return (f"For orientation, a different model on different data: BioViL-T reports CNR {vals[('BioViL-T', 'CNR')]} "
            f"and mIoU {vals[('BioViL-T', 'mIoU')]} on MS-CXR phrase grounding (published, not this run).")


def literature_blocks() -> list:
    """A paragraph and the table of published values (empty when there are none)."""
    if not PUBLISHED:
        return []
    return [Paragraph("For orientation only: published localisation results of OTHER models on other data, each "
                      "under its authors' protocol. They are not this run's numbers and not directly comparable "
                      "(different models, datasets, map resolutions and thresholds); compare methods within this "
                      "run first."),
            Table("published_localisation", literature_table(),
                  caption="Published values of other models (not this run)")]
