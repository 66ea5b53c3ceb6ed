"""Reading yes/no answers by whole-word rules, on realistic phrasings; scoring against labels."""
from __future__ import annotations

import math

import pytest

from metrics import classification_summary, parse_yes_no

PHRASINGS = [
    # leading yes / no
    ("Yes.", "yes"),
    ("YES", "yes"),
    ("**Yes**, there is a small left pleural effusion.", "yes"),
    ("yes, there is a small left pleural effusion.", "yes"),
    ("No.", "no"),
    ("NO!", "no"),
    ("No, the lungs are clear.", "no"),
    ("No, there is no evidence of pneumothorax.", "no"),
    ("No definite consolidation; mild bibasilar atelectasis may be present.", "no"),  # leading No wins
    ("Nope.", "no"),
    ("The answer is no.", "no"),
    ("Answer: yes", "yes"),
    # negations
    ("There is no pleural effusion.", "no"),
    ("There are no focal opacities.", "no"),
    ("No evidence of pneumothorax.", "no"),
    ("Negative for consolidation.", "no"),
    ("The costophrenic angles are sharp without effusion.", "no"),
    ("Pneumothorax is absent.", "no"),
    ("A nodule is not seen.", "no"),
    ("The heart isn't enlarged.", "no"),
    ("The lungs show no focal consolidation.", "no"),
    ("Previously seen effusion has resolved.", "no"),
    ("Pneumothorax has been ruled out.", "no"),
    ("Nothing abnormal is detected in the lungs.", "no"),
    # affirmations; "abnormal" is never a "no"
    ("Abnormal: there is a large right effusion.", "yes"),
    ("Findings are consistent with cardiomegaly.", "yes"),
    ("There is a 1 cm nodule in the right upper lobe.", "yes"),
    ("Evidence of left lower lobe consolidation.", "yes"),
    ("A small effusion is present.", "yes"),
    ("The radiograph demonstrates a right apical pneumothorax.", "yes"),
    ("Opacity compatible with pneumonia in the left lower zone.", "yes"),
    ("An endotracheal tube is noted, tip 4 cm above the carina.", "yes"),
    # hedges
    ("Pleural effusion cannot be excluded.", "uncertain"),
    ("A small pneumothorax cannot be ruled out.", "uncertain"),
    ("We can't exclude a small effusion.", "uncertain"),
    ("Early pneumonia is not excluded.", "uncertain"),
    ("No, although a small effusion cannot be excluded.", "uncertain"),  # exclusion beats a leading No
    ("No definite effusion, although a small one cannot be excluded.", "uncertain"),
    ("Possible small left effusion.", "uncertain"),
    ("Yes, there is a right lower lobe opacity which may represent pneumonia.", "uncertain"),  # hedge beats yes
    ("There may be a small nodule.", "uncertain"),
    ("Likely atelectasis, less likely pneumonia.", "uncertain"),
    ("Pneumonia is unlikely.", "uncertain"),
    ("Findings suspicious for pneumonia.", "uncertain"),
    ("Questionable opacity at the right base.", "uncertain"),
    ("Indeterminate nodule.", "uncertain"),
    ("Equivocal findings.", "uncertain"),
    ("I am not sure.", "uncertain"),
    ("Unclear; clinical correlation recommended.", "uncertain"),
    ("Atelectasis versus consolidation.", "uncertain"),
    ("Findings suggestive of early edema.", "uncertain"),
    ("This could be a small pneumothorax.", "uncertain"),
    # nothing to go on
    ("The cardiac silhouette is abnormal and enlarged.", "unparsed"),
    ("Normal chest radiograph.", "unparsed"),
    ("Known nodule, stable.", "unparsed"),
    ("Cleft in the left hemidiaphragm.", "unparsed"),
    ("", "unparsed"),
    ("   ", "unparsed"),
    (None, "unparsed"),
]


@pytest.mark.parametrize("text,expected", PHRASINGS)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_enough_realistic_phrasings():
    assert len(PHRASINGS) >= 30
    assert {e for _, e in PHRASINGS} == {"yes", "no", "uncertain", "unparsed"}


def test_classification_summary_keeps_states_apart():
    pred = ["yes", "no", "yes", "no", "uncertain", "yes", "unparsed", "no", "yes"]
    labels = [1.0, 0.0, 0.0, 1.0, 1.0, -1.0, 0.0, None, float("nan")]
    s = classification_summary(pred, labels)
    assert (s["tp"], s["tn"], s["fp"], s["fn"]) == (1, 1, 1, 1)
    assert s["n"] == 9 and s["n_scored"] == 4
    assert s["answer_uncertain"] == 1 and s["answer_unparsed"] == 1
    assert s["label_uncertain"] == 1 and s["label_not_mentioned"] == 2
    assert s["accuracy"] == 0.5 and s["sensitivity"] == 0.5 and s["specificity"] == 0.5
    assert all(isinstance(v, float) for v in s.values())


def test_classification_summary_rates_and_errors():
    s = classification_summary(["yes", "yes", "yes", "no"], [1.0, 1.0, 0.0, 0.0])
    assert s["sensitivity"] == 1.0 and s["specificity"] == 0.5 and s["accuracy"] == 0.75
    only_pos = classification_summary(["yes"], [1.0])
    assert math.isnan(only_pos["specificity"]) and only_pos["sensitivity"] == 1.0
    assert math.isnan(classification_summary([], [])["accuracy"])
    with pytest.raises(ValueError):
        classification_summary(["yes"], [1.0, 0.0])  # lengths differ
    with pytest.raises(ValueError):
        classification_summary(["maybe"], [1.0])  # not a parse_yes_no state
    with pytest.raises(ValueError):
        classification_summary(["yes"], [2.0])  # not a label state
