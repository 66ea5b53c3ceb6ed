"""Reading yes/no answers by whole-word rules, on realistic phrasings; scoring against labels."""
from __future__ import annotations

import math

import pytest

from metrics import classification_summary, parse_yes_no

PHRASINGS = [
    ("Yes.", "yes"),
    ("yes, there is a small left pleural effusion.", "yes"),
    ("No.", "no"),
    ("No, the lungs are clear.", "no"),
    ("There is no pleural effusion.", "no"),
    ("No evidence of pneumothorax.", "no"),
    ("Negative for consolidation.", "no"),
    ("The costophrenic angles are sharp without effusion.", "no"),
    ("Pneumothorax is absent.", "no"),
    ("A nodule is not seen.", "no"),
    ("Abnormal: there is a large right effusion.", "yes"),
    ("The cardiac silhouette is abnormal and enlarged.", "unparsed"),
    ("Normal chest radiograph.", "unparsed"),
    ("Findings are consistent with cardiomegaly.", "yes"),
    ("There is a 1 cm nodule in the right upper lobe.", "yes"),
    ("Evidence of left lower lobe consolidation.", "yes"),
    ("A small effusion is present.", "yes"),
    ("Pleural effusion cannot be excluded.", "uncertain"),
    ("A small pneumothorax cannot be ruled out.", "uncertain"),
    ("Possible small left effusion.", "uncertain"),
    ("There may be a small nodule.", "uncertain"),
    ("Likely atelectasis, less likely pneumonia.", "uncertain"),
    ("Findings suspicious for pneumonia.", "uncertain"),
    ("Questionable opacity at the right base.", "uncertain"),
    ("Indeterminate nodule.", "uncertain"),
    ("Equivocal findings.", "uncertain"),
    ("I am not sure.", "uncertain"),
    ("Unclear; clinical correlation recommended.", "uncertain"),
    ("No definite effusion, although a small one cannot be excluded.", "uncertain"),
    ("Atelectasis versus consolidation.", "uncertain"),
    ("YES", "yes"),
    ("NO!", "no"),
    ("The lungs show no focal consolidation.", "no"),
    ("Known nodule, stable.", "unparsed"),
    ("", "unparsed"),
]


@pytest.mark.parametrize("text,expected", PHRASINGS)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_classification_summary_keeps_states_apart():
    pred = ["yes", "no", "yes", "no", "uncertain", "yes", "unparsed", "no", "yes"]
    labels = [1.0, 0.0, 0.0, 1.0, 1.0, -1.0, 0.0, None, float("nan")]
    s = classification_summary(pred, labels)
    assert (s["tp"], s["tn"], s["fp"], s["fn"]) == (1, 1, 1, 1)
    assert s["answer_uncertain"] == 1 and s["answer_unparsed"] == 1
    assert s["label_uncertain"] == 1 and s["label_not_mentioned"] == 2
    assert s["accuracy"] == 0.5 and s["sensitivity"] == 0.5 and s["specificity"] == 0.5
    assert math.isnan(classification_summary([], [])["accuracy"])
