"""Explicit pyarrow schemas of every table in a run directory (see DESIGN.md, data contracts)."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipeline.vocabulary import LABEL_COLUMNS


@dataclass(frozen=True)
class TableSpec:
    """A table's name, explicit schema and key columns (unique per row)."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]

BOX = pa.struct(
    [
        ("finding", pa.string()),  # vocabulary name
        ("x", pa.float32()),  # left edge, pixels of the stored image (top-left origin)
        ("y", pa.float32()),  # top edge, pixels
        ("w", pa.float32()),  # width, pixels
        ("h", pa.float32()),  # height, pixels
    ]
)

SAMPLES = pa.schema(
    [
        ("sample_id", pa.string()),  # "<dataset>:<image_id>:<prompt_id>"
        ("dataset", pa.string()),
        ("image_id", pa.string()),
        ("study_id", pa.string()),
        ("subject_id", pa.string()),
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
        ("lung_mask_path", pa.string()),  # where the source has lung masks (demo), else null
        ("view_position", pa.string()),  # upper case: PA, AP, LATERAL, LL, ... ("" unknown)
        ("split", pa.string()),
        ("width", pa.int32()),  # pixels of the decoded image
        ("height", pa.int32()),
        ("prompt_id", pa.string()),
        ("prompt_text", pa.string()),
        ("prompt_kind", pa.string()),  # free_text | yes_no
        ("prompt_finding", pa.string()),  # the finding a yes/no prompt asks about
        ("prompt_style", pa.string()),
        ("format_instruction", pa.bool_()),
        *[(c, pa.float32()) for c in LABEL_COLUMNS],  # 1.0 / 0.0 / -1.0 / null (not mentioned)
        ("boxes", pa.list_(BOX)),
        ("report_text", pa.string()),
        ("shard", pa.int32()),
    ]
)

GENERATIONS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("answer", pa.string()),
        ("sequence_ids", pa.list_(pa.int32())),  # prompt + answer ids, exactly as explained
        ("prompt_length", pa.int32()),  # answer tokens are sequence_ids[prompt_length:]
        ("n_new_tokens", pa.int32()),
        ("stopped", pa.string()),  # eos | max_new_tokens
        ("model_name", pa.string()),
        ("seconds", pa.float32()),  # wall time of the sample's share of its batch
        ("shard", pa.int32()),
    ]
)

RELEVANCY = pa.schema(
    [
        ("sample_id", pa.string()),
        ("target_kind", pa.string()),  # keywords | answer_token | answer_span | answer_tokens
        ("target_label", pa.string()),
        ("token_start", pa.int32()),  # explained tokens: sequence_ids[token_start:token_end]
        ("token_end", pa.int32()),
        ("char_start", pa.int32()),  # the target's characters in the answer
        ("char_end", pa.int32()),
        ("matched_text", pa.string()),
        ("method", pa.string()),
        ("status", pa.string()),  # ok | not_mentioned
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("image_map", pa.list_(pa.float32())),  # row-major grid_h x grid_w, raw (not normalised)
        ("text_map", pa.list_(pa.float32())),  # relevancy over all sequence positions (or null)
        ("target_score", pa.float32()),  # the explained score: sum of the target tokens' logits
        ("argmax_matches", pa.bool_()),  # teacher-forced argmax reproduces the answer
        ("image_tokens_ok", pa.bool_()),  # image-token count == grid_h * grid_w
        ("seconds", pa.float32()),
        ("shard", pa.int32()),
    ]
)

ERRORS = pa.schema(
    [
        ("stage", pa.string()),
        ("sample_id", pa.string()),  # "<dataset>:<image_id>:*" for an image-level failure
        ("image_id", pa.string()),
        ("error_type", pa.string()),  # e.g. truncated, missing, OutOfMemoryError
        ("exception", pa.string()),
        ("message", pa.string()),
        ("traceback", pa.string()),
        ("time_utc", pa.string()),
        ("shard", pa.int32()),
    ]
)


TABLES = {
    "samples": TableSpec("samples", SAMPLES, ("sample_id",)),
    "generations": TableSpec("generations", GENERATIONS, ("sample_id",)),
    "relevancy": TableSpec(
        "relevancy", RELEVANCY, ("sample_id", "target_kind", "target_label", "token_start", "method")
    ),
    "errors": TableSpec("errors", ERRORS, ("stage", "sample_id")),
}
