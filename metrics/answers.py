"""Reading yes/no answers, and scoring them against dataset labels.

`parse_yes_no(text)` returns "yes", "no", "uncertain" or "unparsed". The text is lower-cased,
markdown emphasis and curly quotes are dropped, "n't" becomes " not" and "cannot" "can not";
every cue below matches whole words only, so "abnormal", "normal", "nodule", "know", "nothing"
or "cleft" never match "no" / "left" / ... by accident. Rules, in order of precedence (the
first that applies decides):

1. empty or missing text: "unparsed".
2. an exclusion hedge anywhere: "cannot be excluded", "cannot be ruled out", "cannot exclude",
   "cannot rule out", "can't exclude", "not excluded", "not ruled out", "difficult to exclude":
   "uncertain" (this wins even over a leading "No").
3. the answer opens with the word "no" (or "nope"): "no".
4. a hedge anywhere: "possible", "possibly", "probable", "probably", "may", "might", "could",
   "likely", "unlikely", "perhaps", "suspicious for/of", "suspected", "suspect", "concerning for",
   "suggest(s/ive/ing)", "questionable", "indeterminate", "equivocal", "uncertain", "unclear",
   "not sure", "unsure", "not certain", "cannot be determined", "difficult to assess/evaluate/
   determine", "borderline", "versus", "vs": "uncertain" (hedges win over "yes": "Yes, which may
   represent pneumonia" is uncertain).
5. the answer opens with the word "yes": "yes".
6. the first whole word "yes" or "no" elsewhere ("The answer is no."): that word.
7. a negation: "no evidence of", "there is no", "negative for", "negative", "absent",
   "absence of", "without", "not seen / present / identified / visualized / visible / noted /
   demonstrated", "not", "none", "nothing", "free of", "ruled out", "excluded", "resolved":
   "no".
8. an affirmation: "present", "positive for", "evidence of", "there is / are", "consistent with",
   "compatible with", "demonstrates", "shows", "showing", "seen", "identified", "noted",
   "visible", "representing", "represents": "yes".
9. otherwise "unparsed" (e.g. "Normal chest radiograph.": whether that means yes or no depends on
   the question, so it is not guessed).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

__all__ = ["ANSWER_STATES", "classification_summary", "parse_yes_no"]

ANSWER_STATES = ("yes", "no", "uncertain", "unparsed")

_EXCLUSION = (
    r"can not (?:be )?(?:entirely |completely |fully |definitely )?(?:excluded|ruled out)",
    r"can not (?:entirely |completely |definitely )?(?:exclude|rule out)",
    r"not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)",
    r"difficult to (?:exclude|rule out)",
)
_HEDGES = (
    r"possible", r"possibly", r"probable", r"probably", r"may", r"might", r"could", r"likely", r"unlikely",
    r"perhaps", r"suspicious (?:for|of)", r"suspected", r"suspect", r"concerning for", r"suggest(?:s|ive|ing)?",
    r"questionable", r"indeterminate", r"equivocal", r"uncertain", r"unclear", r"not sure", r"unsure",
    r"not certain", r"can not be determined", r"difficult to (?:assess|evaluate|determine)", r"borderline",
    r"versus", r"vs",
)
_NO = (
    r"no evidence of", r"there (?:is|are) no", r"negative(?: for)?", r"absent", r"absence of", r"without",
    r"not (?:seen|present|identified|visuali[sz]ed|visible|noted|demonstrated)", r"not", r"none", r"nothing",
    r"free of", r"ruled out", r"excluded", r"resolved",
)
_YES = (
    r"present", r"positive for", r"evidence of", r"there (?:is|are)", r"consistent with", r"compatible with",
    r"demonstrates?", r"shows?", r"showing", r"seen", r"identified", r"noted", r"visible", r"represent(?:s|ing)",
)


def _rx(words: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w'])(?:" + "|".join(words) + r")(?![\w'])")


_EXCLUSION_RX, _HEDGE_RX, _NO_RX, _YES_RX = _rx(_EXCLUSION), _rx(_HEDGES), _rx(_NO), _rx(_YES)
_OPENING_RX = re.compile(r"^\W*(yes|no|nope)(?![\w'])")
_ANY_YN_RX = _rx((r"yes", r"no"))


def _normalise(text: str) -> str:
    t = str(text).lower()
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    t = re.sub(r"[*_#>]+", " ", t)  # markdown emphasis, headings, quotes
    t = re.sub(r"\bcannot\b", "can not", t)
    t = re.sub(r"\bcan't\b", "can not", t)
    t = re.sub(r"n't\b", " not", t)
    return " ".join(t.split())


def parse_yes_no(text: str | None) -> str:
    """Read a free-text answer to a yes/no question as "yes", "no", "uncertain" or "unparsed".

    Whole-word rules on the lower-cased text, in the order of precedence given in the module
    docstring: exclusion hedges ("cannot be excluded") > a leading "No" > other hedges > a leading
    "Yes" > the first "yes"/"no" > negations > affirmations > "unparsed".
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "unparsed"
    t = _normalise(text)
    if not t:
        return "unparsed"
    if _EXCLUSION_RX.search(t):
        return "uncertain"
    opening = _OPENING_RX.match(t)
    if opening and opening.group(1) in ("no", "nope"):
        return "no"
    if _HEDGE_RX.search(t):
        return "uncertain"
    if opening:
        return "yes"
    first = _ANY_YN_RX.search(t)
    if first:
        return first.group(0)
    if _NO_RX.search(t):
        return "no"
    if _YES_RX.search(t):
        return "yes"
    return "unparsed"


def _label_state(label: float | None) -> str:
    if label is None:
        return "not_mentioned"
    try:
        v = float(label)
    except (TypeError, ValueError):
        raise ValueError(f"a label is 1.0, 0.0, -1.0, None or NaN, got {label!r}") from None
    if math.isnan(v):
        return "not_mentioned"
    states = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
    if v not in states:
        raise ValueError(f"a label is 1.0, 0.0, -1.0, None or NaN, got {label!r}")
    return states[v]


def classification_summary(predicted: Iterable[str], labels: Iterable[float | None]) -> dict[str, float]:
    """Counts and rates of parsed yes/no answers against dataset labels.

    `predicted`: answers as returned by `parse_yes_no` ("yes", "no", "uncertain", "unparsed");
    `labels`: 1.0 positive, 0.0 negative, -1.0 uncertain (CheXpert convention), None or NaN not
    mentioned. Both of the same length (ValueError otherwise, and for any other value).

    Only definite answers ("yes"/"no") on definite labels (1.0/0.0) are scored: tp (yes on
    positive), fp (yes on negative), tn, fn; accuracy = (tp + tn) / scored, sensitivity =
    tp / (tp + fn), specificity = tn / (tn + fp), NaN when a denominator is 0. Kept apart and
    counted: rows with an uncertain label (`label_uncertain`) or none (`label_not_mentioned`), whatever
    the answer; rows with a definite label whose answer is uncertain (`answer_uncertain`) or
    unparsed (`answer_unparsed`). `n` counts all rows, `n_scored` the scored ones; all values are
    floats.
    """
    preds, labs = list(predicted), list(labels)
    if len(preds) != len(labs):
        raise ValueError(f"{len(preds)} answers but {len(labs)} labels")
    out = dict.fromkeys(("n", "n_scored", "tp", "fp", "tn", "fn", "label_uncertain", "label_not_mentioned",
                         "answer_uncertain", "answer_unparsed"), 0)
    for pred, lab in zip(preds, labs):
        if pred not in ANSWER_STATES:
            raise ValueError(f"an answer is one of {ANSWER_STATES}, got {pred!r}")
        out["n"] += 1
        state = _label_state(lab)
        if state == "not_mentioned":
            out["label_not_mentioned"] += 1
        elif state == "uncertain":
            out["label_uncertain"] += 1
        elif pred in ("uncertain", "unparsed"):
            out[f"answer_{pred}"] += 1
        else:
            key = ("tp" if pred == "yes" else "fn") if state == "positive" else ("fp" if pred == "yes" else "tn")
            out[key] += 1
            out["n_scored"] += 1
    tp, fp, tn, fn = out["tp"], out["fp"], out["tn"], out["fn"]
    res: dict[str, float] = {k: float(v) for k, v in out.items()}
    res["accuracy"] = (tp + tn) / (tp + fp + tn + fn) if tp + fp + tn + fn else math.nan
    res["sensitivity"] = tp / (tp + fn) if tp + fn else math.nan
    res["specificity"] = tn / (tn + fp) if tn + fp else math.nan
    return res
