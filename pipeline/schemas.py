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
        ("target_score", pa.float32()),  # the explained score, of score_kind (logit: sum of the target tokens' logits)
        ("argmax_matches", pa.bool_()),  # teacher-forced argmax reproduces the answer
        ("image_tokens_ok", pa.bool_()),  # image-token count == grid_h * grid_w
        ("seconds", pa.float32()),
        ("shard", pa.int32()),
        ("score_kind", pa.string()),  # explain.score in force: logit | logprob | contrast (null: written before; logit)
        ("contrast_token", pa.string()),  # contrast: the counterpart token explained against (null: plain logit)
        ("completeness_error", pa.float32()),  # integrated_gradients: |sum of attributions - (S(x) - S(baseline))|
        ("conservation_error", pa.float32()),  # attnlrp: |sum of input relevance - target_score|
    ]
)

KEY_FIELDS = [
    ("sample_id", pa.string()),
    ("target_kind", pa.string()),
    ("target_label", pa.string()),
    ("token_start", pa.int32()),
    ("method", pa.string()),
]

METRICS = pa.schema(
    [
        *KEY_FIELDS,
        ("image_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt_kind", pa.string()),
        ("view_position", pa.string()),
        ("finding", pa.string()),  # the finding whose boxes localise this target (null: none)
        ("finding_side", pa.string()),  # patient side of that finding's boxes: left/right/bilateral
        ("n_boxes", pa.int32()),
        ("mass", pa.float32()),  # total raw map mass
        ("inside_body_ratio", pa.float32()),  # mass weighted by cell body coverage / mass
        ("border_fraction", pa.float32()),  # mass in the outer ring of cells / mass
        ("entropy_bits", pa.float32()),  # Shannon entropy of the normalised map, bits
        ("entropy_norm", pa.float32()),  # entropy_bits / log2(cells)
        ("patient_left_fraction", pa.float32()),  # mass on the patient's left of the patient's midline; NaN: not frontal
        ("patient_left_fraction_centre", pa.float32()),  # the same split at the image's centre column
        ("apical_fraction", pa.float32()),  # thirds of the body's vertical extent
        ("middle_fraction", pa.float32()),
        ("basal_fraction", pa.float32()),
        ("pointing_hit", pa.float32()),  # 1/0: argmax cell centre inside a box; NaN: no boxes
        ("box_mass_fraction", pa.float32()),  # mass inside the boxes / mass
        ("box_area_fraction", pa.float32()),  # box area / image area: the random floor of the above
        ("box_iou", pa.float32()),  # IoU of the Otsu-binarised map with the boxes (cheXlocalize)
        ("iou_top", pa.float32()),  # IoU of the cells covering metrics.iou_top_fraction of the image
        ("cnr", pa.float32()),  # MS-CXR contrast-to-noise ratio inside vs outside the boxes
        ("first_token_fraction", pa.float32()),  # mass on the first image token / mass (attention sink)
        ("corner_fraction", pa.float32()),  # mass on the four corner cells / mass
        ("side_agrees", pa.float32()),  # laterality targets: mass on the side the word states / mass
        ("body_area_fraction", pa.float32()),  # body mask area / image area
        ("shard", pa.int32()),
    ]
)

SENSITIVITY = pa.schema(
    [
        ("image_id", pa.string()),
        ("target_kind", pa.string()),
        ("target_label", pa.string()),  # finding (keywords; the asked finding for answer_token)
        ("method", pa.string()),
        ("prompt_a", pa.string()),
        ("prompt_b", pa.string()),
        ("style_a", pa.string()),
        ("style_b", pa.string()),
        ("format_a", pa.bool_()),
        ("format_b", pa.bool_()),
        ("js_divergence", pa.float32()),  # bits, 0..1
        ("js_distance", pa.float32()),  # sqrt of the divergence
        ("answer_a", pa.string()),
        ("answer_b", pa.string()),
        ("parsed_a", pa.string()),  # yes / no / uncertain / unparsed (yes/no prompts)
        ("parsed_b", pa.string()),
        ("answers_agree", pa.bool_()),  # null when either answer is not a yes/no question's
        ("shard", pa.int32()),
    ]
)

ANSWERS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_id", pa.string()),
        ("prompt_id", pa.string()),
        ("finding", pa.string()),  # the finding a yes/no prompt asks about
        ("answer", pa.string()),
        ("parsed", pa.string()),  # yes / no / uncertain / unparsed
        ("label", pa.float32()),  # 1.0 / 0.0 / -1.0 / null
        ("label_state", pa.string()),  # positive / negative / uncertain / not_mentioned
        ("correct", pa.bool_()),  # null unless both the answer and the label are definite
        ("shard", pa.int32()),
    ]
)

FAITHFULNESS = pa.schema(
    [
        *KEY_FIELDS,
        ("baseline", pa.string()),  # what replaces an image token's embedding
        ("fractions", pa.list_(pa.float32())),  # fraction of image tokens removed / revealed
        ("deletion", pa.list_(pa.float32())),  # target log-probability at each fraction
        ("insertion", pa.list_(pa.float32())),
        ("random_deletion", pa.list_(pa.float32())),  # random order: the floor
        ("random_insertion", pa.list_(pa.float32())),
        ("deletion_auc", pa.float32()),  # trapezoid area over fractions 0..1 (lower is better)
        ("insertion_auc", pa.float32()),  # (higher is better)
        ("random_deletion_auc", pa.float32()),
        ("random_insertion_auc", pa.float32()),
        ("shard", pa.int32()),
    ]
)

BODY_MASKS = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_sha256", pa.string()),
        ("height", pa.int32()),  # pixels of the decoded image (as samples/ width, height)
        ("width", pa.int32()),
        ("mask", pa.binary()),  # numpy.packbits of the boolean body mask, row-major (null on error)
        ("error", pa.string()),  # why no mask could be computed (e.g. a constant image), else null
        ("midline_x0", pa.float64()),  # the patient's midline x(y) = x0 + slope * (y - height / 2), pixels
        ("midline_slope", pa.float64()),  # dx / dy
        ("midline_source", pa.string()),  # "image" (found) or "image_centre" (not found: see midline_reason)
        ("midline_reason", pa.string()),  # why the image's centre column is used, else null
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
    "relevancy": TableSpec("relevancy", RELEVANCY, tuple(n for n, _ in KEY_FIELDS)),
    "metrics": TableSpec("metrics", METRICS, tuple(n for n, _ in KEY_FIELDS)),
    "sensitivity": TableSpec(
        "sensitivity", SENSITIVITY, ("image_id", "target_kind", "target_label", "method", "prompt_a", "prompt_b")
    ),
    "answers": TableSpec("answers", ANSWERS, ("sample_id",)),
    "faithfulness": TableSpec("faithfulness", FAITHFULNESS, tuple(n for n, _ in KEY_FIELDS)),
    "body_masks": TableSpec("body_masks", BODY_MASKS, ("image_id",)),
    "errors": TableSpec("errors", ERRORS, ("stage", "sample_id")),
}
