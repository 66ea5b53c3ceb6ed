"""Prompt sets: which questions each image is asked, and the words that name each finding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.vocabulary import canonical_finding


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    kind: str  # free_text | yes_no
    finding: str | None  # vocabulary name for yes/no prompts
    style: str
    format_instruction: bool


def prompt_variants(prompts_cfg: Any) -> list[Prompt]:
    """The variants of a prompt set, restricted to `only_findings` for yes/no questions."""
    only = {canonical_finding(f) for f in prompts_cfg.only_findings}
    out = []
    for v in prompts_cfg.variants:
        finding = canonical_finding(v.finding) if v.finding else None
        if only and v.kind == "yes_no" and finding not in only:
            continue
        out.append(Prompt(v.id, v.text, v.kind, finding, v.style, bool(v.format_instruction)))
    return out


def finding_synonyms(prompts_cfg: Any) -> dict[str, list[str]]:
    """Finding name -> words that name it in an answer (the name itself always included)."""
    out: dict[str, list[str]] = {}
    for name, words in prompts_cfg.synonyms.items():
        f = canonical_finding(name)
        seen = [f.lower()] + [str(w).lower() for w in words]
        out[f] = list(dict.fromkeys(seen))
    return out


def sample_id(dataset: str, image_id: str, prompt_id: str) -> str:
    """Stable key of one image x one prompt."""
    return f"{dataset}:{image_id}:{prompt_id}"
