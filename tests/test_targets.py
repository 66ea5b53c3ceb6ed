"""Backprop targets over answer tokens, with the tiny Gemma-style tokenizer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from pipeline.targets import (
    TargetSpan,
    answer_char_offsets,
    answer_span_target,
    answer_token_target,
    answer_tokens_targets,
    decode_answer,
    keyword_targets,
    laterality_targets,
    special_token_ids,
)
from pipeline.tiny_model import build_tiny_gemma3

PROMPT = "<bos><start_of_turn>user\nWhat do you see?<end_of_turn>\n<start_of_turn>model\n"
FINDINGS = {
    "Pleural Effusion": ["pleural effusion", "effusion"],
    "Cardiomegaly": ["cardiomegaly", "enlarged heart"],
    "Pneumothorax": ["pneumothorax"],
    "Edema": ["edema", "pulmonary edema"],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoProcessor

    path: Path = build_tiny_gemma3(tmp_path_factory.mktemp("tiny_tok"))
    return AutoProcessor.from_pretrained(path).tokenizer


def make(tok: Any, answer: str, end_of_turn: bool = True) -> tuple[list[int], int]:
    """A stored sequence: prompt ids + answer ids (+ <end_of_turn>)."""
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    ids = tok(answer, add_special_tokens=False).input_ids
    if end_of_turn:
        ids = ids + [tok.convert_tokens_to_ids("<end_of_turn>")]
    return prompt + ids, len(prompt)


def explained_text(tok: Any, seq: list[int], t: TargetSpan) -> str:
    return tok.decode(seq[t.token_start : t.token_end], skip_special_tokens=True)


# --- character offsets ---------------------------------------------------------------------------


def test_answer_char_offsets_sentencepiece_pieces(tok: Any) -> None:
    answer = "There is a small left pleural effusion and cardiomegaly. No pneumothorax."
    seq, plen = make(tok, answer)
    text, spans = answer_char_offsets(tok, seq, plen)
    assert text == answer == decode_answer(tok, seq, plen)
    assert len(spans) == len(seq) - plen
    assert spans[-1] == (len(text), len(text))  # <end_of_turn>: special, empty
    pieces = [text[a:b] for a, b in spans[:-1]]
    assert "".join(pieces) == text
    assert " left" in pieces and " pleural" in pieces  # "▁left" covers the space before the word
    for (a, b), tid in zip(spans[:-1], seq[plen:-1]):
        assert text[a:b] == tok.decode([tid])


def test_answer_char_offsets_multibyte_characters(tok: Any) -> None:
    answer = "Café effusion 🙂 ok"
    seq, plen = make(tok, answer, end_of_turn=False)
    text, spans = answer_char_offsets(tok, seq, plen)
    assert text == answer
    pieces = tok.convert_ids_to_tokens(seq[plen:])
    byte_spans = {spans[k] for k, p in enumerate(pieces) if p.startswith("<0x")}
    assert (answer.index("é"), answer.index("é") + 1) in byte_spans
    assert (answer.index("🙂"), answer.index("🙂") + 1) in byte_spans
    emoji = [k for k, p in enumerate(pieces) if p in {"<0xF0>", "<0x9F>", "<0x99>", "<0x82>"}]
    assert len(emoji) == 4 and all(text[slice(*spans[k])] == "🙂" for k in emoji)


def test_answer_char_offsets_random_ids_are_consistent(tok: Any) -> None:
    rng = random.Random(0)
    special = special_token_ids(tok)
    vocab = len(tok)
    for _ in range(20):
        answer_ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        text, spans = answer_char_offsets(tok, [2] + answer_ids, 1)
        assert text == tok.decode(answer_ids, skip_special_tokens=True)
        starts = [a for a, _ in spans]
        assert starts == sorted(starts)
        for (a, b), tid in zip(spans, answer_ids):
            assert 0 <= a <= b <= len(text)
            if tid in special:
                assert a == b


# --- keywords ------------------------------------------------------------------------------------


def test_keywords_multi_piece_words_and_not_found(tok: Any) -> None:
    answer = "There is a small left pleural effusion and cardiomegaly. No pneumothorax."
    seq, plen = make(tok, answer)
    targets, missing = keyword_targets(tok, seq, plen, FINDINGS)
    assert [t.label for t in targets] == ["Pleural Effusion", "Cardiomegaly", "Pneumothorax"]
    assert missing == ["Edema"]
    for t in targets:
        assert t.kind == "keywords" and t.token_start >= plen
        assert answer[t.char_start : t.char_end] == t.matched_text
        assert t.matched_text.lower() in explained_text(tok, seq, t).lower()
    effusion, cardio, ptx = targets
    assert effusion.matched_text == "pleural effusion"  # longest synonym wins, one target
    assert effusion.token_end - effusion.token_start == 2
    # words outside the tiny vocabulary are split into several pieces: all of them are explained
    assert cardio.token_end - cardio.token_start > 1
    assert ptx.token_end - ptx.token_start > 1
    assert explained_text(tok, seq, cardio).strip() == "cardiomegaly"
    # the sentence's final "." is not part of the explained tokens
    assert not explained_text(tok, seq, ptx).endswith(".")


def test_keywords_whole_words_only(tok: Any) -> None:
    answer = "A cleft lip. The left lung is clear."
    seq, plen = make(tok, answer)
    pieces = tok.convert_ids_to_tokens(seq[plen:])
    assert "left" in pieces  # "cleft" contains a "left" piece: token matching would be wrong
    targets, missing = keyword_targets(tok, seq, plen, {"Left": ["left"]})
    assert missing == [] and len(targets) == 1
    t = targets[0]
    assert t.char_start == answer.index(" left") + 1
    assert explained_text(tok, seq, t) == " left"


def test_keywords_plurals_need_a_synonym(tok: Any) -> None:
    answer = "Bilateral effusions."
    seq, plen = make(tok, answer)
    targets, missing = keyword_targets(tok, seq, plen, {"Pleural Effusion": ["effusion"]})
    assert targets == [] and missing == ["Pleural Effusion"]
    targets, missing = keyword_targets(tok, seq, plen, {"Pleural Effusion": ["effusion", "effusions"]})
    assert missing == [] and [t.matched_text for t in targets] == ["effusions"]
    assert explained_text(tok, seq, targets[0]) == " effusions"  # "▁effusion" + "s"


def test_keywords_every_occurrence_is_a_target(tok: Any) -> None:
    answer = "Left effusion. Right EFFUSION, and effusion\n again."
    seq, plen = make(tok, answer)
    targets, missing = keyword_targets(tok, seq, plen, {"Pleural Effusion": ["effusion"]})
    assert [t.matched_text for t in targets] == ["effusion", "EFFUSION", "effusion"]
    assert len({t.token_start for t in targets}) == 3
    starts = [t.token_start for t in targets]
    assert starts == sorted(starts)


def test_keywords_multi_word_flexible_whitespace_and_case(tok: Any) -> None:
    answer = "Small PLEURAL \n  effusion on the right."
    seq, plen = make(tok, answer)
    targets, _ = keyword_targets(tok, seq, plen, {"Pleural Effusion": ["pleural effusion"]})
    assert len(targets) == 1 and targets[0].matched_text == "PLEURAL \n  effusion"


def test_keywords_overlapping_labels_longest_wins(tok: Any) -> None:
    answer = "Pulmonary edema and edema of the soft tissue."
    seq, plen = make(tok, answer)
    findings = {"Edema": ["edema"], "Pulmonary Edema": ["pulmonary edema"], "Soft Tissue": ["soft tissue"]}
    targets, missing = keyword_targets(tok, seq, plen, findings)
    assert [(t.label, t.matched_text) for t in targets] == [
        ("Pulmonary Edema", "Pulmonary edema"),
        ("Edema", "edema"),
        ("Soft Tissue", "soft tissue"),
    ]
    assert missing == []
    # the label itself is always a synonym
    targets, _ = keyword_targets(tok, seq, plen, {"Soft Tissue": []})
    assert [t.matched_text for t in targets] == ["soft tissue"]


# --- yes/no, span, tokens ------------------------------------------------------------------------


def test_laterality_targets_place_the_finding_of_their_sentence(tok: Any) -> None:
    answer = "Left pleural effusion. The right lung is clear; cleft of the right apical pneumothorax."
    seq, plen = make(tok, answer)
    ts = laterality_targets(tok, seq, plen, FINDINGS)
    assert [(t.matched_text, t.label) for t in ts] == [("Left", "Pleural Effusion"), ("right", "Pneumothorax")]
    assert all(t.kind == "laterality" for t in ts)
    assert [explained_text(tok, seq, t).strip() for t in ts] == ["Left", "right"]
    assert answer[ts[1].char_start : ts[1].char_end] == "right" and ts[1].char_start > answer.index("cleft")


def test_laterality_targets_fall_back_to_the_asked_finding(tok: Any) -> None:
    seq, plen = make(tok, "yes. left lower zone.")
    assert laterality_targets(tok, seq, plen, FINDINGS) == []  # no finding named, none asked
    (t,) = laterality_targets(tok, seq, plen, FINDINGS, prompt_finding="Consolidation")
    assert (t.label, t.matched_text, explained_text(tok, seq, t).strip()) == ("Consolidation", "left", "left")


def test_answer_token_target(tok: Any) -> None:
    seq, plen = make(tok, "No, there is no effusion.")
    t = answer_token_target(tok, seq, plen)
    assert t is not None and t.kind == "answer_token" and t.label == "no"
    assert (t.char_start, t.char_end, t.matched_text) == (0, 2, "No")
    assert t.token_start == plen and explained_text(tok, seq, t) == "No"
    seq, plen = make(tok, "The lungs are abnormal. Not normal.")
    assert answer_token_target(tok, seq, plen) is None  # "no" inside "abnormal"/"Not" does not count
    seq, plen = make(tok, "Findings: yes.")
    t = answer_token_target(tok, seq, plen)
    assert t is not None and t.label == "yes" and explained_text(tok, seq, t) == " yes"


def test_answer_span_target_excludes_end_of_turn(tok: Any) -> None:
    answer = "Yes, a small left effusion."
    seq, plen = make(tok, answer)
    t = answer_span_target(tok, seq, plen)
    assert (t.kind, t.label, t.token_start, t.token_end) == ("answer_span", "answer", plen, len(seq) - 1)
    assert t.matched_text == answer and (t.char_start, t.char_end) == (0, len(answer))
    seq2, plen2 = make(tok, answer, end_of_turn=False)
    assert answer_span_target(tok, seq2, plen2).token_end == len(seq2)
    with pytest.raises(ValueError):
        answer_span_target(tok, seq[: plen + 0] + [tok.convert_tokens_to_ids("<end_of_turn>")], plen)


def test_answer_tokens_targets(tok: Any) -> None:
    answer = "Left cardiomegaly."
    seq, plen = make(tok, answer)
    targets = answer_tokens_targets(tok, seq, plen)
    assert len(targets) == len(seq) - plen - 1  # every token but <end_of_turn>
    assert [t.token_start for t in targets] == list(range(plen, len(seq) - 1))
    assert all(t.token_end == t.token_start + 1 and t.kind == "answer_tokens" for t in targets)
    assert "".join(t.matched_text for t in targets) == answer
    assert targets[0].label == "Left"
    assert all(t.label == t.matched_text.strip() for t in targets)
