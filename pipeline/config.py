"""Structured (dataclass) schemas for the Hydra configuration.

Every config group in `conf/` is validated against one of these dataclasses, so an unknown key or
a value of the wrong type stops the run at start with a message naming the key. Values whose
allowed set is known (stage names, dataset names, methods, targets, dtypes) are checked by
`validate` before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from pipeline import method_names
from pipeline.method_names import ALL_METHODS

STAGES: tuple[str, ...] = ("load", "generate", "explain", "faithfulness", "score", "compact", "report")
DATASETS: tuple[str, ...] = ("mimic_cxr", "nih_cxr14", "manifest", "demo")
SIDE_MARKER_MODES: tuple[str, ...] = ("default", "none", "lesion_side", "opposite")
TARGET_KINDS: tuple[str, ...] = ("keywords", "laterality", "answer_token", "answer_span", "answer_tokens")
METHODS: tuple[str, ...] = ALL_METHODS  # built-in names; validation also accepts registered plug-ins
SCORE_KINDS: tuple[str, ...] = ("logit", "logprob", "contrast")  # pipeline.relevancy.scores.SCORE_KINDS
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")
PROMPT_KINDS: tuple[str, ...] = ("free_text", "yes_no")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class DatasetConfig:
    """Which images to load. One schema for every source; `name` picks the loader."""

    name: str = "demo"
    root: Optional[str] = None  # dataset directory (mimic_cxr, nih_cxr14; demo: cache dir)
    path: Optional[str] = None  # manifest dataset: CSV or Parquet file
    views: List[str] = field(default_factory=lambda: ["PA", "AP"])  # empty: every view
    splits: List[str] = field(default_factory=list)  # empty: every split
    findings: List[str] = field(default_factory=list)  # keep images labelled positive for any
    limit: Optional[int] = None  # first N images after filtering (before sharding)
    shard: int = 0
    num_shards: int = 1
    one_image_per_study: bool = False
    labeler: str = "chexpert"  # mimic_cxr: chexpert or negbio label file
    reports: bool = False  # mimic_cxr: attach the free-text report
    boxes_file: Optional[str] = None  # MS-CXR style box CSV; default: found in root
    max_pixels: int = 60_000_000  # decompression-bomb guard (width x height)
    seed: int = 0  # demo: phantom generator seed
    n: int = 24  # demo: number of phantom images
    side_markers: str = "default"  # demo: default | none | lesion_side | opposite (see conf/dataset/demo.yaml)


@dataclass
class ModelConfig:
    """The vision-language model to explain (a hub id or a local directory)."""

    name: str = MISSING
    name_or_path: str = MISSING
    revision: Optional[str] = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    device_map: Optional[str] = None  # e.g. "auto" to spread over GPUs with accelerate
    local_files_only: Optional[bool] = None  # None: follow HF_HUB_OFFLINE
    attn_implementation: str = "vision_sdpa"  # eager | sdpa | vision_sdpa (pipeline.model.ATTN_IMPLEMENTATIONS)


@dataclass
class PromptVariant:
    """One phrasing of a question. `finding` is the vocabulary name it asks about (yes/no)."""

    id: str = MISSING
    text: str = MISSING
    kind: str = "free_text"  # free_text | yes_no
    finding: Optional[str] = None
    style: str = "technical"  # technical | lay
    format_instruction: bool = False


@dataclass
class PromptsConfig:
    """A prompt set: phrasings plus per-finding synonyms used to find findings in answers."""

    name: str = MISSING
    system_prompt: Optional[str] = None
    variants: List[PromptVariant] = field(default_factory=list)
    synonyms: Dict[str, List[str]] = field(default_factory=dict)
    only_findings: List[str] = field(default_factory=list)  # empty: ask about every finding


@dataclass
class GenerateConfig:
    batch_size: int = 8
    max_new_tokens: int = 64


@dataclass
class ExplainConfig:
    targets: List[str] = field(default_factory=lambda: ["keywords", "laterality", "answer_token", "answer_span"])
    methods: List[str] = field(default_factory=lambda: ["chefer", "raw_attention", "random"])
    chunk_size: int = 8  # targets whose gradients are computed together (at most)
    memory_budget_gb: Optional[float] = None  # cap on those targets' gradient memory (GiB); null: none
    seed: int = 0  # seed of the random floor
    explorer_samples: int = 8  # first sample of this many images: every answer token explained too
    occlusion_block: int = 1  # occlusion: k x k blocks of image tokens
    occlusion_baseline: str = "mean"  # what replaces an occluded token's embedding: mean | zero
    perturbation_batch_size: int = 16  # perturbed variants per forward pass (occlusion, integrated_gradients)
    score: str = "logit"  # what gradient methods explain: logit | logprob | contrast (pipeline.relevancy.scores)
    # contrast: a single-token target's word against its counterpart (either way round)
    contrast_pairs: List[List[str]] = field(default_factory=lambda: [["yes", "no"], ["left", "right"]])
    ig_steps: int = 16  # integrated_gradients: midpoint steps along the path
    ig_baseline: str = "mean"  # integrated_gradients: mean | zero image-token baseline


#: keys that moved from `metrics` to the `faithfulness` group (a run passing the old one fails)
MOVED_METRICS_KEYS: dict[str, str] = {
    "faithfulness": "faithfulness.enabled",
    "faithfulness_steps": "faithfulness.steps",
    "faithfulness_kinds": "faithfulness.kinds",
    "faithfulness_baseline": "faithfulness.baseline",
}


@dataclass
class MetricsConfig:
    min_inside_body_ratio: float = 0.7
    max_border_fraction: float = 0.05
    max_entropy_norm: float = 0.85
    max_js_divergence: float = 0.2
    left_fraction_range: List[float] = field(default_factory=lambda: [0.3, 0.7])
    max_sink_fraction: float = 0.5  # first-token or corner mass above this flags an attention sink
    iou_top_fraction: float = 0.1  # image share binarised for iou_top (cheXlocalize-style fixed fraction)
    # moved to the faithfulness group (MOVED_METRICS_KEYS): accepted by the schema only so that
    # validate() can name the new key; any value fails.
    faithfulness: Optional[Any] = None
    faithfulness_steps: Optional[Any] = None
    faithfulness_kinds: Optional[Any] = None
    faithfulness_baseline: Optional[Any] = None


@dataclass
class FaithfulnessConfig:
    """Deletion / insertion curves of the stored maps (stage `faithfulness`; needs the model)."""

    enabled: Optional[bool] = None  # null: on for dataset=demo, off otherwise (forward passes per map)
    steps: int = 8
    # target kinds whose maps get curves (each map costs about 2 x steps perturbed forward passes)
    kinds: List[str] = field(default_factory=lambda: ["keywords", "laterality", "answer_token"])
    baseline: str = "mean"  # mean | zero
    batch_size: int = 16  # perturbed variants per forward pass


@dataclass
class ReportConfig:
    include_images: bool = True  # false: no patient image anywhere in the report (data use agreements)
    bootstrap: int = 1000  # percentile-bootstrap resamples per 95% interval (0: no intervals)
    gallery_size: int = 8  # targets drawn in the overlay gallery (one panel per method each)
    seed: int = 0  # seeds the bootstrap and the choice of gallery targets and explorer samples
    explorer_samples: int = 8  # samples in token_explorer.html (answer_tokens targets); 0: none
    explorer_image_size: int = 320  # longest side, pixels, of the explorer's downscaled images
    engine_memory_limit: str = "2GB"  # DuckDB memory limit of the report's queries (spills beyond)
    engine_threads: int = 0  # DuckDB threads (0: the machine's cores, at most 8)


@dataclass
class Config:
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    run_dir: str = MISSING
    seed: int = 0
    retry_errors: bool = False  # re-attempt keys that have an errors/ row for the stage
    allow_config_change: bool = False  # resume a run dir whose identity config differs
    flush_mb: float = 32.0  # a table's buffered rows are written as one part file at this size (MiB)
    flush_seconds: float = 300.0  # ... or after this long (bounds the work a killed job loses)
    compact_mb: float = 256.0  # stage compact: merged part files of up to this size (MiB)
    lock_timeout: float = 0.0  # seconds to wait for a shard another process holds (0: refuse at once)
    progress: bool = True
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="prompts", name="prompts_schema", node=PromptsConfig)


def faithfulness_enabled(cfg: Any) -> bool:
    """`faithfulness.enabled`, where null means: on for dataset=demo, off otherwise."""
    f = cfg.faithfulness.enabled
    return cfg.dataset.name == "demo" if f is None else bool(f)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")


def _validate_explain(e: Any) -> None:
    """explain.methods (the method registry's names, pipeline.method_names), score and its pairs."""
    for m in e.methods:
        _check_choice("explain.methods", m, method_names.known_methods())
    _check_choice("explain.occlusion_baseline", e.occlusion_baseline, ("mean", "zero"))
    _check_choice("explain.ig_baseline", e.ig_baseline, ("mean", "zero"))
    _check_choice("explain.score", e.score, SCORE_KINDS)
    for pair in e.contrast_pairs:
        if len(pair) != 2 or not all(isinstance(w, str) and w.strip() for w in pair) or pair[0] == pair[1]:
            raise ConfigError(f"explain.contrast_pairs: {list(pair)} must be two different words")


def _validate_faithfulness(cfg: Any) -> None:
    """The faithfulness group; the keys that moved out of metrics fail, naming where they went."""
    for old, new in MOVED_METRICS_KEYS.items():
        if OmegaConf.select(cfg, f"metrics.{old}") is not None:
            raise ConfigError(f"metrics.{old} moved to {new} (the faithfulness stage); set {new} instead")
    _check_choice("faithfulness.baseline", cfg.faithfulness.baseline, ("mean", "zero"))
    for k in cfg.faithfulness.kinds:
        _check_choice("faithfulness.kinds", k, TARGET_KINDS)


def validate(cfg: Any) -> None:
    """Check values whose allowed set is known; raise ConfigError naming the key."""
    if not cfg.stages:
        raise ConfigError("stages is empty; give at least one of: " + ", ".join(STAGES))
    for s in cfg.stages:
        _check_choice("stages", s, STAGES)
    order = [STAGES.index(s) for s in cfg.stages]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ConfigError(f"stages={list(cfg.stages)} must be distinct and in pipeline order: {', '.join(STAGES)}")
    d = cfg.dataset
    _check_choice("dataset.name", d.name, DATASETS)
    if d.num_shards < 1:
        raise ConfigError(f"dataset.num_shards={d.num_shards} must be >= 1")
    if not 0 <= d.shard < d.num_shards:
        raise ConfigError(f"dataset.shard={d.shard} must be in [0, dataset.num_shards={d.num_shards})")
    if d.limit is not None and d.limit < 0:
        raise ConfigError(f"dataset.limit={d.limit} must be >= 0")
    _check_choice("dataset.labeler", d.labeler, ("chexpert", "negbio"))
    _check_choice("dataset.side_markers", d.side_markers, SIDE_MARKER_MODES)
    if d.name == "manifest" and not d.path:
        raise ConfigError("dataset.path is required for dataset=manifest (a CSV or Parquet file)")
    if d.name in ("mimic_cxr", "nih_cxr14") and not d.root:
        raise ConfigError(f"dataset.root is required for dataset={d.name}")
    if d.n < 1:
        raise ConfigError(f"dataset.n={d.n} must be >= 1")
    _check_choice("model.dtype", cfg.model.dtype, DTYPES)
    from pipeline.model import ATTN_IMPLEMENTATIONS

    _check_choice("model.attn_implementation", cfg.model.attn_implementation, ATTN_IMPLEMENTATIONS)
    if cfg.generate.batch_size < 1:
        raise ConfigError(f"generate.batch_size={cfg.generate.batch_size} must be >= 1")
    if cfg.generate.max_new_tokens < 1:
        raise ConfigError(f"generate.max_new_tokens={cfg.generate.max_new_tokens} must be >= 1")
    for t in cfg.explain.targets:
        _check_choice("explain.targets", t, TARGET_KINDS)
    _validate_explain(cfg.explain)
    _validate_faithfulness(cfg)
    if cfg.explain.explorer_samples < 0:
        raise ConfigError(f"explain.explorer_samples={cfg.explain.explorer_samples} must be >= 0")
    for key in ("explain.occlusion_block", "explain.perturbation_batch_size", "explain.ig_steps",
                "faithfulness.steps", "faithfulness.batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be >= 1")
    if cfg.explain.memory_budget_gb is not None and cfg.explain.memory_budget_gb <= 0:
        raise ConfigError(f"explain.memory_budget_gb={cfg.explain.memory_budget_gb} must be > 0 (or null)")
    if cfg.explain.chunk_size < 1:
        raise ConfigError(f"explain.chunk_size={cfg.explain.chunk_size} must be >= 1")
    for key in ("flush_mb", "flush_seconds", "compact_mb"):
        if not float(cfg[key]) > 0:
            raise ConfigError(f"{key}={cfg[key]} must be > 0")
    if float(cfg.lock_timeout) < 0:
        raise ConfigError(f"lock_timeout={cfg.lock_timeout} must be >= 0 (seconds)")
    lo_hi = list(cfg.metrics.left_fraction_range)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"metrics.left_fraction_range={lo_hi} must be [low, high] within [0, 1]")
    ids = [v.id for v in cfg.prompts.variants]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"prompts.variants: duplicate id(s) {dup}")
    from pipeline.vocabulary import canonical_finding

    for i, v in enumerate(cfg.prompts.variants):
        _check_choice(f"prompts.variants[{i}].kind", v.kind, PROMPT_KINDS)
        if v.kind == "yes_no" and not v.finding:
            raise ConfigError(f"prompts.variants[{i}] ({v.id}) is yes_no but names no finding")
        if v.finding:
            try:
                canonical_finding(v.finding)
            except KeyError as e:
                raise ConfigError(f"prompts.variants[{i}].finding: {e.args[0]}") from None
    for key in list(cfg.prompts.synonyms) + list(cfg.prompts.only_findings) + list(d.findings):
        try:
            canonical_finding(key)
        except KeyError as e:
            raise ConfigError(f"finding name in prompts/dataset config: {e.args[0]}") from None
