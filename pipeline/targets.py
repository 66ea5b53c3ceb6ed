"""Which answer tokens an explanation explains: keyword, yes/no word, whole answer, each token.

All functions work on a stored generation (``sequence_ids`` = prompt + answer, ``prompt_length``)
and the tokenizer. The decoded answer is ``tokenizer.decode(answer_ids, skip_special_tokens=True,
clean_up_tokenization_spaces=False)``, the same text ``Generation.answer`` holds. Character spans
per token come from decoding growing prefixes of the answer ids, so they are exact for
SentencePiece-style pieces ("▁left" covers " left"), special tokens get empty spans, and the
byte-fallback pieces of one multi-byte character all get that character's span.

Keyword matching (``keyword_targets``): every synonym is matched case-insensitively as a whole
word (no letter, digit or underscore directly before or after; hyphens and punctuation are
boundaries) with any run of whitespace between the words of a multi-word synonym. Every
occurrence is its own target. When matches overlap, the longest wins (ties: earlier start, then
the finding listed first); a match with exactly the same characters as an accepted one but for a
different finding is also kept. A target's tokens are all answer tokens whose character span
overlaps the match, so a word split into several pieces is explained by all of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TargetSpan",
    "answer_char_offsets",
    "answer_span_target",
    "answer_token_target",
    "answer_tokens_targets",
    "decode_answer",
    "keyword_targets",
    "laterality_targets",
    "special_token_ids",
]

_YES_NO = re.compile(r"(?<!\w)(yes|no)(?!\w)", re.IGNORECASE)
_SIDE = re.compile(r"(?<!\w)(left|right)(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class TargetSpan:
    """Explained tokens ``sequence_ids[token_start:token_end]`` and the answer text they cover."""

    kind: str  # "keywords" | "laterality" | "answer_token" | "answer_span" | "answer_tokens"
    label: str  # finding name (keywords, laterality), the word (yes/no or token text), or "answer"
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    matched_text: str


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of all special tokens (named, extra, and added tokens flagged special)."""
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode_answer(tokenizer: Any, sequence_ids: Sequence[int], prompt_length: int) -> str:
    """The answer text: answer ids decoded without special tokens."""
    _check(sequence_ids, prompt_length)
    return _decode(tokenizer, sequence_ids[prompt_length:])


def _check(sequence_ids: Sequence[int], prompt_length: int) -> None:
    if not 0 <= prompt_length <= len(sequence_ids):
        raise ValueError(f"prompt_length {prompt_length} outside 0..{len(sequence_ids)}")


def answer_char_offsets(
    tokenizer: Any, sequence_ids: Sequence[int], prompt_length: int
) -> tuple[str, list[tuple[int, int]]]:
    """Decoded answer and each answer token's ``(char_start, char_end)`` in it."""
    _check(sequence_ids, prompt_length)
    answer_ids = [int(i) for i in sequence_ids[prompt_length:]]
    text = _decode(tokenizer, answer_ids)
    special = special_token_ids(tokenizer)
    # boundaries[k] = length of the text decoded from the first k tokens, or None where that
    # prefix ends inside a multi-byte character (its decoding is not a prefix of the text).
    boundaries: list[int | None] = [0]
    last = 0
    for k in range(1, len(answer_ids) + 1):
        if answer_ids[k - 1] in special:
            boundaries.append(boundaries[-1])
            continue
        prefix = _decode(tokenizer, answer_ids[:k])
        valid = text.startswith(prefix) and len(prefix) >= last
        boundaries.append(len(prefix) if valid else None)
        if valid:
            last = len(prefix)
    boundaries[-1] = len(text)
    spans: list[tuple[int, int]] = []
    for k, tid in enumerate(answer_ids):
        start = next(b for b in reversed(boundaries[: k + 1]) if b is not None)
        if tid in special:
            spans.append((start, start))
            continue
        end = next(b for b in boundaries[k + 1 :] if b is not None)
        spans.append((start, end))
    return text, spans


def _token_range(spans: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int] | None:
    """Answer-relative ``[first, last + 1)`` of tokens whose span overlaps the characters."""
    hits = [k for k, (a, b) in enumerate(spans) if a < char_end and b > char_start]
    if not hits:
        return None
    return hits[0], hits[-1] + 1


def _synonym_pattern(synonym: str) -> re.Pattern[str] | None:
    words = synonym.split()
    if not words:
        return None
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def keyword_targets(
    tokenizer: Any,
    sequence_ids: Sequence[int],
    prompt_length: int,
    findings: Mapping[str, Sequence[str]],
) -> tuple[list[TargetSpan], list[str]]:
    """One target per occurrence of any finding's synonym; returns (targets, labels not found).

    ``findings`` maps a label to its synonyms; the label itself is always matched too.
    Targets are ordered by position in the answer.
    """
    text, spans = answer_char_offsets(tokenizer, sequence_ids, prompt_length)
    candidates: list[tuple[int, int, int, str]] = []  # (start, end, label order, label)
    for order, (label, synonyms) in enumerate(findings.items()):
        terms = {s.strip().lower(): s for s in [label, *synonyms] if s and s.strip()}
        for term in terms.values():
            pattern = _synonym_pattern(term)
            if pattern is None:
                continue
            for m in pattern.finditer(text):
                candidates.append((m.start(), m.end(), order, label))
    candidates = sorted(set(candidates), key=lambda c: (-(c[1] - c[0]), c[0], c[2]))
    accepted: list[tuple[int, int, int, str]] = []
    for cand in candidates:
        start, end, _, label = cand
        clash = False
        for a_start, a_end, _, a_label in accepted:
            if start < a_end and end > a_start:
                if (start, end) == (a_start, a_end) and label != a_label:
                    continue
                clash = True
                break
        if not clash:
            accepted.append(cand)
    targets: list[TargetSpan] = []
    for start, end, order, label in sorted(accepted, key=lambda c: (c[0], c[2])):
        rng = _token_range(spans, start, end)
        if rng is None:  # pragma: no cover - a non-empty match always overlaps a token
            continue
        targets.append(
            TargetSpan(
                kind="keywords",
                label=label,
                token_start=prompt_length + rng[0],
                token_end=prompt_length + rng[1],
                char_start=start,
                char_end=end,
                matched_text=text[start:end],
            )
        )
    found = {t.label for t in targets}
    return targets, [label for label in findings if label not in found]


def laterality_targets(
    tokenizer: Any,
    sequence_ids: Sequence[int],
    prompt_length: int,
    findings: Mapping[str, Sequence[str]],
    prompt_finding: str | None = None,
) -> list[TargetSpan]:
    """One target per whole word "left" / "right" of the answer, labelled with the finding it
    places: the first finding named in the same sentence (sentences end at ".", ";" or a
    newline), else ``prompt_finding`` (the finding a yes/no question asks about). A side word
    with neither is skipped. ``matched_text`` is the side word as written.
    """
    text, spans = answer_char_offsets(tokenizer, sequence_ids, prompt_length)
    named = keyword_targets(tokenizer, sequence_ids, prompt_length, findings)[0]
    out: list[TargetSpan] = []
    for m in _SIDE.finditer(text):
        start = max(text.rfind(c, 0, m.start()) for c in ".;\n") + 1
        ends = [i for i in (text.find(c, m.end()) for c in ".;\n") if i >= 0]
        end = min(ends) if ends else len(text)
        in_sentence = [t.label for t in named if t.char_start >= start and t.char_end <= end]
        label = in_sentence[0] if in_sentence else prompt_finding
        rng = _token_range(spans, m.start(), m.end())
        if not label or rng is None:
            continue
        out.append(
            TargetSpan(
                kind="laterality",
                label=label,
                token_start=prompt_length + rng[0],
                token_end=prompt_length + rng[1],
                char_start=m.start(),
                char_end=m.end(),
                matched_text=m.group(0),
            )
        )
    return out


def answer_token_target(tokenizer: Any, sequence_ids: Sequence[int], prompt_length: int) -> TargetSpan | None:
    """The first whole word "yes" or "no" (any case) of the answer, or None."""
    text, spans = answer_char_offsets(tokenizer, sequence_ids, prompt_length)
    m = _YES_NO.search(text)
    if m is None:
        return None
    rng = _token_range(spans, m.start(), m.end())
    if rng is None:  # pragma: no cover
        return None
    return TargetSpan(
        kind="answer_token",
        label=m.group(1).lower(),
        token_start=prompt_length + rng[0],
        token_end=prompt_length + rng[1],
        char_start=m.start(),
        char_end=m.end(),
        matched_text=m.group(0),
    )


def _content_tokens(tokenizer: Any, sequence_ids: Sequence[int], prompt_length: int) -> list[int]:
    special = special_token_ids(tokenizer)
    return [k for k, tid in enumerate(sequence_ids[prompt_length:]) if int(tid) not in special]


def answer_span_target(tokenizer: Any, sequence_ids: Sequence[int], prompt_length: int) -> TargetSpan:
    """The whole answer: first to last non-special answer token (drops <end_of_turn>/<eos>).

    Raises ValueError when the answer has no non-special token.
    """
    text, _ = answer_char_offsets(tokenizer, sequence_ids, prompt_length)
    content = _content_tokens(tokenizer, sequence_ids, prompt_length)
    if not content:
        raise ValueError("the answer has no non-special tokens to explain")
    return TargetSpan(
        kind="answer_span",
        label="answer",
        token_start=prompt_length + content[0],
        token_end=prompt_length + content[-1] + 1,
        char_start=0,
        char_end=len(text),
        matched_text=text,
    )


def answer_tokens_targets(tokenizer: Any, sequence_ids: Sequence[int], prompt_length: int) -> list[TargetSpan]:
    """One target per non-special answer token; label is the token's text without surrounding spaces."""
    text, spans = answer_char_offsets(tokenizer, sequence_ids, prompt_length)
    out: list[TargetSpan] = []
    for k in _content_tokens(tokenizer, sequence_ids, prompt_length):
        a, b = spans[k]
        piece = text[a:b]
        out.append(
            TargetSpan(
                kind="answer_tokens",
                label=piece.strip() or piece,
                token_start=prompt_length + k,
                token_end=prompt_length + k + 1,
                char_start=a,
                char_end=b,
                matched_text=piece,
            )
        )
    return out
