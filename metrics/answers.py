"""Reading yes/no answers, and scoring them against dataset labels.

`parse_yes_no(text)` returns "yes", "no", "uncertain" or "unparsed" by whole-word rules on the
lower-cased text, in this order of precedence:

1. uncertain: a hedge anywhere: "cannot be excluded", "cannot be ruled out", "can't exclude",
   "not excluded", "possible", "possibly", "probable", "probably", "may", "might", "likely",
   "unlikely", "suspicious for", "suspected", "questionable", "indeterminate", "equivocal",
   "uncertain", "unclear", "not sure", "cannot determine", "difficult to assess", "borderline",
   "versus" / "vs". (Hedges win over yes and no: "no definite effusion, although small one
   cannot be excluded" is uncertain.)
2. the first whole word "yes" or "no" (so "abnormal", "normal", "nodule", "know" never read as no).
3. no: "negative for", "no evidence of", "without", "absent", "not seen", "not present",
   "not identified", "not visualized", "there is no", "free of", "none".
4. yes: "present", "positive for", "evidence of", "there is", "there are", "consistent with",
   "compatible with", "demonstrates", "shows", "seen", "identified", "noted".
5. otherwise "unparsed".
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

__all__ = ["classification_summary", "parse_yes_no"]

_HEDGES = (
    r"cannot be (?:excluded|ruled out)", r"can ?not be (?:excluded|ruled out)", r"can'?t (?:exclude|rule out)",
    r"not (?:be )?excluded", r"possible", r"possibly", r"probable", r"probably", r"may", r"might", r"likely",
    r"unlikely", r"suspicious for", r"suspected", r"questionable", r"indeterminate", r"equivocal", r"uncertain",
    r"unclear", r"not sure", r"cannot (?:be )?determined?", r"difficult to (?:assess|evaluate)", r"borderline",
    r"versus", r"vs",
)
_NO = (r"negative for", r"no evidence of", r"without", r"absent", r"not (?:seen|present|identified|visuali[sz]ed)",
       r"there is no", r"there are no", r"free of", r"none")
_YES = (r"present", r"positive for", r"evidence of", r"there (?:is|are)", r"consistent with", r"compatible with",
        r"demonstrates?", r"shows?", r"seen", r"identified", r"noted")


def _rx(words: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w'])(?:" + "|".join(words) + r")(?![\w'])")


_HEDGE_RX, _NO_RX, _YES_RX = _rx(_HEDGES), _rx(_NO), _rx(_YES)
_FIRST_YN = re.compile(r"(?<![\w'])(yes|no)(?![\w'])")


def parse_yes_no(text: str | None) -> str:
    """"yes", "no", "uncertain" or "unparsed" (rules in the module docstring)."""
    if not text:
        return "unparsed"
    t = " ".join(str(text).lower().split())
    if _HEDGE_RX.search(t):
        return "uncertain"
    m = _FIRST_YN.search(t)
    if m:
        return m.group(1)
    if _NO_RX.search(t):
        return "no"
    if _YES_RX.search(t):
        return "yes"
    return "unparsed"


def classification_summary(predicted: Iterable[str], labels: Iterable[float | None]) -> dict[str, float]:
    """Counts and rates of yes/no answers against labels (1.0 positive, 0.0 negative, -1.0
    uncertain, None/NaN not mentioned).

    Only definite answers (yes/no) on definite labels (1.0/0.0) are scored: tp, fp, tn, fn,
    accuracy, sensitivity = tp/(tp+fn), specificity = tn/(tn+fp) (NaN when undefined). Uncertain
    and unmentioned labels, and uncertain and unparsed answers, are counted apart.
    """
    out = dict.fromkeys(("tp", "fp", "tn", "fn", "label_uncertain", "label_not_mentioned", "answer_uncertain",
                         "answer_unparsed", "n"), 0)
    for pred, lab in zip(predicted, labels):
        out["n"] += 1
        if lab is None or (isinstance(lab, float) and math.isnan(lab)):
            out["label_not_mentioned"] += 1
            continue
        if lab == -1.0:
            out["label_uncertain"] += 1
            continue
        if pred == "uncertain":
            out["answer_uncertain"] += 1
            continue
        if pred not in ("yes", "no"):
            out["answer_unparsed"] += 1
            continue
        positive = lab == 1.0
        key = ("tp" if pred == "yes" else "fn") if positive else ("fp" if pred == "yes" else "tn")
        out[key] += 1
    tp, fp, tn, fn = out["tp"], out["fp"], out["tn"], out["fn"]
    res: dict[str, float] = {k: float(v) for k, v in out.items()}
    res["accuracy"] = (tp + tn) / (tp + fp + tn + fn) if tp + fp + tn + fn else math.nan
    res["sensitivity"] = tp / (tp + fn) if tp + fn else math.nan
    res["specificity"] = tn / (tn + fp) if tn + fp else math.nan
    return res
