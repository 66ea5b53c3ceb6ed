"""Target scores: what the gradient methods explain (``explain.score``).

For a target explaining tokens ``p in [start, end)`` of ``input_ids`` (``t_p = input_ids[p]``)
and logits ``z`` (float32; row ``p - 1`` predicts ``t_p``):

- ``logit`` (default; Chefer et al. 2021): ``s = sum_p z[p-1, t_p]``;
- ``logprob``: ``s = sum_p log_softmax(z[p-1])[t_p]`` (nats);
- ``contrast``: ``s = z[p-1, t_p] - z[p-1, c]`` for a single-token target whose token has a
  counterpart ``c`` (yes vs no, left vs right: :func:`counterpart_id`); it equals the
  log-probability difference ``log P(t_p) - log P(c)`` (the softmax normaliser cancels), so it
  asks "why this answer rather than its opposite". A target without a counterpart (several
  tokens, or a word outside the pairs) is scored by its plain logit; its ``counterpart`` is
  ``None`` and the stage records that.

Perturbation methods and faithfulness curves keep their own score (the log-probability).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .inputs import Target

__all__ = ["SCORE_KINDS", "DEFAULT_CONTRAST_PAIRS", "ScoreSelection", "counterpart_id", "target_scores"]

SCORE_KINDS: tuple[str, ...] = ("logit", "logprob", "contrast")
DEFAULT_CONTRAST_PAIRS: tuple[tuple[str, str], ...] = (("yes", "no"), ("left", "right"))

#: word-boundary markers a sub-word token may start with (SentencePiece, byte-level BPE)
_MARKERS = ("\u2581", "\u0120", " ")


@dataclass(frozen=True)
class ScoreSelection:
    """Which logits make up each target's score (built once per sequence).

    ``rows``, ``cols``, ``target``, ``sign``: one entry per logit term: kept-logit row, token id,
    target index and +1 / -1 (contrast counterparts are the -1 terms, after every +1 term).
    ``kind``: one of :data:`SCORE_KINDS`; ``counterparts``: per target the contrast token id or
    ``None``.
    """

    kind: str
    rows: list[int]
    cols: list[int]
    target: list[int]
    sign: list[float]
    counterparts: tuple[int | None, ...]
    n_targets: int

    @classmethod
    def build(cls, targets: Sequence[Target], token_ids: torch.Tensor, row_index: dict[int, int],
              kind: str = "logit", counterparts: Sequence[int | None] | None = None) -> ScoreSelection:
        """``token_ids`` (N,) on the CPU; ``row_index`` maps a logit row ``p - 1`` to its kept row."""
        if kind not in SCORE_KINDS:
            raise ValueError(f"unknown score {kind!r}; known: {', '.join(SCORE_KINDS)}")
        counter = tuple(counterparts) if counterparts is not None else (None,) * len(targets)
        if len(counter) != len(targets):
            raise ValueError(f"{len(counter)} contrast counterparts for {len(targets)} targets")
        if kind != "contrast":
            counter = (None,) * len(targets)
        rows, cols, tgt, sign = [], [], [], []
        for ti, t in enumerate(targets):
            for p in t.positions:
                rows.append(row_index[p - 1]), cols.append(int(token_ids[p])), tgt.append(ti), sign.append(1.0)
        for ti, (t, c) in enumerate(zip(targets, counter)):
            if c is None:
                continue
            if t.end - t.start != 1:
                raise ValueError(f"contrast needs a single-token target, got [{t.start}, {t.end})")
            rows.append(row_index[t.start - 1]), cols.append(int(c)), tgt.append(ti), sign.append(-1.0)
        return cls(kind, rows, cols, tgt, sign, counter, len(targets))


def target_scores(logits: torch.Tensor, sel: ScoreSelection) -> torch.Tensor:
    """Scores (B, T) float32 of ``sel``'s targets from kept logits (B, K, V) (any dtype; on the
    autograd graph when ``logits`` is)."""
    dev = logits.device
    rows = torch.tensor(sel.rows, device=dev, dtype=torch.long)
    cols = torch.tensor(sel.cols, device=dev, dtype=torch.long)
    tgt = torch.tensor(sel.target, device=dev, dtype=torch.long)
    picked = logits[:, rows, cols].float()  # (B, S)
    if sel.kind == "logprob":
        picked = picked - torch.logsumexp(logits[:, rows].float(), dim=-1)
    if any(s < 0 for s in sel.sign):
        picked = picked * torch.tensor(sel.sign, device=dev, dtype=torch.float32)
    out = torch.zeros((logits.shape[0], sel.n_targets), device=dev, dtype=torch.float32)
    return out.index_add(1, tgt, picked)


def counterpart_id(tokenizer, token_id: int, pairs: Sequence[Sequence[str]] = DEFAULT_CONTRAST_PAIRS) -> int | None:
    """The single-token id of ``token_id``'s counterpart word, or ``None``.

    The token's text, without its word-boundary marker, is matched case-insensitively against
    each pair ``(a, b)`` (either way round); the counterpart keeps the marker and the case
    pattern (``"\u2581Left"`` -> ``"\u2581Right"``). ``None`` when the word is in no pair or the
    counterpart is not one token of the vocabulary.
    """
    tok = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(tok, str):
        return None
    lead = next((m for m in _MARKERS if tok.startswith(m)), "")
    word = tok[len(lead):]
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            if word.lower() != str(x).lower():
                continue
            other = str(y).upper() if word.isupper() and len(word) > 1 else (
                str(y).capitalize() if word[:1].isupper() else str(y).lower())
            cid = tokenizer.convert_tokens_to_ids(lead + other)
            unk = getattr(tokenizer, "unk_token_id", None)
            if cid is None or cid == unk or tokenizer.convert_ids_to_tokens(int(cid)) != lead + other:
                return None
            return int(cid)
    return None
