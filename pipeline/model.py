"""Load a Gemma 3 style vision-language model (MedGemma) and its processor for the pipeline.

``load_model`` is the only place where weights are loaded. It accepts a Hugging Face hub id
(``google/medgemma-4b-it``) or a local directory written by ``save_pretrained``, never runs
remote code, loads safetensors only, freezes the parameters and puts the model in eval mode.

Offline use: point ``model.name_or_path`` at a local directory, or pre-populate the hub cache
(``huggingface-cli download google/medgemma-4b-it``) and set ``HF_HUB_OFFLINE=1``; the
environment variable is honoured at call time.

Weights fingerprint (``LoadedModel.fingerprint``): ``sha256:`` over, for every ``*.safetensors``
file of the model in name order, its file name, size, JSON header (tensor names, dtypes, shapes,
offsets) and 16 evenly spaced 64 KiB samples of its data section. It reads about 1 MiB per file,
so it is fast even for multi-GB checkpoints, and it tells apart checkpoints with the same
architecture but different weights (e.g. a fine-tune) with overwhelming probability; it is not
a full content hash. When the weight files cannot be located, the hub commit hash is used
(``git:<sha>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "LoadedModel",
    "ModelLoadError",
    "attn_implementation_arg",
    "describe",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "weights_fingerprint",
]

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_SAMPLES_PER_FILE = 16
_SAMPLE_BYTES = 64 * 1024


class ModelLoadError(OSError):
    """The model or processor could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A frozen model with its processor and the facts the pipeline records about it."""

    model: Any
    processor: Any
    name_or_path: str
    revision: str | None
    dtype: torch.dtype
    device: torch.device
    image_token_id: int  # model.config.image_token_id: the image soft token, not begin-of-image
    end_of_turn_id: int | None
    fingerprint: str
    resolved_revision: str | None  # hub commit hash when loaded from the hub (cache)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; otherwise validated and returned."""
    name = (name or "auto").strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return name


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "vision_sdpa")
"""Attention implementations a model can be loaded with: ``eager`` and ``sdpa`` everywhere, or
``vision_sdpa``: the SigLIP vision tower on sdpa (fused, never materialises its 16 x 4096 x 4096
probabilities per image at 896 px) and the language model on eager. The relevancy engine switches
the language model to its own capturing implementation while it explains, whatever is chosen."""


def attn_implementation_arg(name: str) -> str | dict[str, str]:
    """The ``attn_implementation`` argument of transformers for a name of :data:`ATTN_IMPLEMENTATIONS`."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "vision_sdpa":
        return {"text_config": "eager", "vision_config": "sdpa"}
    return name


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 on CPU; else ``bfloat16``/``float16``/``float32``."""
    if isinstance(name, torch.dtype):
        return name
    key = (name or "auto").strip().lower().removeprefix("torch.")
    if key == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, bfloat16, float16 or float32")
    return _DTYPES[key]


def _looks_like_path(name: str) -> bool:
    """True for names that can only be a filesystem path (not an ``org/name`` hub id)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in {".", ".."}
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
    )


def _safetensors_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.safetensors") if p.is_file())


def weights_fingerprint(directory: str | Path) -> str:
    """Fingerprint of the safetensors weights in ``directory`` (see the module docstring)."""
    files = _safetensors_files(Path(directory))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(path.name.encode() + b"\0" + str(size).encode() + b"\0")
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ValueError(f"{path} is not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ValueError(f"{path} is not a safetensors file (bad header length)")
            digest.update(fh.read(header_len))
            data_start = 8 + header_len
            data_len = size - data_start
            if data_len <= _SAMPLES_PER_FILE * _SAMPLE_BYTES:
                offsets = [data_start]
                read_len = data_len
            else:
                step = (data_len - _SAMPLE_BYTES) // (_SAMPLES_PER_FILE - 1)
                offsets = [data_start + i * step for i in range(_SAMPLES_PER_FILE)]
                read_len = _SAMPLE_BYTES
            for offset in offsets:
                fh.seek(offset)
                digest.update(fh.read(read_len))
    return "sha256:" + digest.hexdigest()


def _hub_snapshot_dir(repo_id: str, commit: str | None) -> Path | None:
    """The local snapshot directory of a hub model in the cache, without network access."""
    if not commit:
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, revision=commit, local_files_only=True, allow_patterns=["*.safetensors"])
    except Exception:  # noqa: BLE001 - best effort: fall back to the commit hash
        return None
    return Path(path)


def _hub_error(name: str, revision: str | None, offline: bool, exc: BaseException) -> ModelLoadError:
    rev = f" (revision {revision})" if revision else ""
    how = (
        "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True) and it is not in the local hub cache"
        if offline
        else "the Hugging Face hub could not be reached or refused the download (gated models need "
        "`huggingface-cli login` and accepted terms)"
    )
    return ModelLoadError(
        f"could not load model {name!r}{rev}: {how}. Either download it once where there is network "
        f"(`huggingface-cli download {name}`) and run with HF_HUB_OFFLINE=1, or point the pipeline at a "
        f"local copy with `model.name_or_path=/local/dir` (a directory written by save_pretrained with "
        f"*.safetensors weights). Underlying error: {type(exc).__name__}: {exc}"
    )


def load_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    attn_implementation: str | None = "vision_sdpa",
    local_files_only: bool | None = None,
) -> LoadedModel:
    """Load model and processor from a hub id or a local directory (safetensors only).

    ``device_map`` (e.g. ``"auto"``) dispatches the model with accelerate; otherwise the whole
    model is moved to ``device``. ``local_files_only=None`` means: True for a local directory or
    when ``HF_HUB_OFFLINE`` is set, else False. Parameters are frozen and the model is in eval
    mode. ``attn_implementation`` is a name of :data:`ATTN_IMPLEMENTATIONS` (default
    ``vision_sdpa``: on an H200 at batch 16 the eager SigLIP tower took MedGemma's peak memory
    from 10 to 49 GiB; docs/benchmarks.md) or ``None`` for transformers' default. Errors are
    :class:`ModelLoadError` (an ``OSError``) with an actionable message.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = str(name_or_path)
    local_dir = Path(name).expanduser()
    is_local = local_dir.is_dir()
    if not is_local and (_looks_like_path(name) or local_dir.exists()):
        if local_dir.exists():
            raise ModelLoadError(f"model path {name!r} is not a directory; expected a save_pretrained directory")
        raise ModelLoadError(
            f"model directory {name!r} does not exist; set model.name_or_path to a directory written by "
            "save_pretrained, or to a hub id such as google/medgemma-4b-it"
        )
    if is_local:
        if not _safetensors_files(local_dir):
            raise ModelLoadError(
                f"no *.safetensors weights in {str(local_dir)!r}: only safetensors checkpoints are loaded "
                "(re-save the model with save_pretrained(dir, safe_serialization=True))"
            )
        if local_files_only is None:
            local_files_only = True
        source = str(local_dir)
    else:
        source = name
        if local_files_only is None:
            local_files_only = _truthy_env("HF_HUB_OFFLINE") or _truthy_env("TRANSFORMERS_OFFLINE")

    device_str = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device_str)
    common: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only, "trust_remote_code": False}

    model_kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, **common}
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation_arg(attn_implementation)
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    try:
        processor = AutoProcessor.from_pretrained(source, **common)
        model = AutoModelForImageTextToText.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as exc:
        if is_local:
            raise ModelLoadError(f"could not load model from local directory {source!r}: {exc}") from exc
        if isinstance(exc, ValueError) and "connect" not in str(exc).lower():
            raise
        raise _hub_error(name, revision, bool(local_files_only), exc) from exc

    if device_map is None:
        model.to(device_str)
    model.eval()
    model.requires_grad_(False)

    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise ModelLoadError(f"{name!r}: model config has no image_token_id; is this a vision-language model?")
    tokenizer = processor.tokenizer
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    end_of_turn_id = eot if isinstance(eot, int) and eot != tokenizer.unk_token_id else None

    resolved_revision: str | None = None
    if is_local:
        fingerprint = weights_fingerprint(local_dir)
    else:
        resolved_revision = _resolved_commit(model, name, revision, local_files_only)
        snapshot = _hub_snapshot_dir(name, resolved_revision)
        if snapshot is not None and _safetensors_files(snapshot):
            fingerprint = weights_fingerprint(snapshot)
        elif resolved_revision:
            fingerprint = f"git:{resolved_revision}"
        else:  # pragma: no cover - hub loads always resolve a commit
            fingerprint = "unknown"

    return LoadedModel(
        model=model,
        processor=processor,
        name_or_path=name,
        revision=revision,
        dtype=torch_dtype,
        device=model.get_input_embeddings().weight.device,
        image_token_id=int(image_token_id),
        end_of_turn_id=end_of_turn_id,
        fingerprint=fingerprint,
        resolved_revision=resolved_revision,
    )


def _resolved_commit(model: Any, repo_id: str, revision: str | None, local_files_only: bool | None) -> str | None:
    """The commit hash the hub id resolved to (from the config or the local cache)."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cached, str):
        # .../models--org--name/snapshots/<commit>/config.json
        parts = Path(cached).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return None


#: A local model directory may carry its own held-out validation (the demo models do:
#: `python -m pipeline.train_demo --evaluate DIR --json DIR/evaluation.json`); `describe` puts it
#: in the manifest and the report shows it.
VALIDATION_FILE = "evaluation.json"


def _validation_of(name_or_path: str) -> dict[str, Any] | None:
    path = Path(name_or_path) / VALIDATION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{path} could not be read: {e}"}


def _attn_of(config: Any) -> dict[str, str | None]:
    """The attention implementation of the model and of each sub-model (text, vision)."""
    out = {"model": getattr(config, "_attn_implementation", None)}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out[key] = sub._attn_implementation
    return out


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """JSON-serialisable facts about the loaded model, for the run manifest (with the model
    directory's VALIDATION_FILE under "validation" when it has one)."""
    cfg = loaded.model.config
    return json.loads(
        json.dumps(
            {
                "validation": _validation_of(loaded.name_or_path),
                "name_or_path": loaded.name_or_path,
                "revision": loaded.revision,
                "resolved_revision": loaded.resolved_revision,
                "fingerprint": loaded.fingerprint,
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "device": str(loaded.device),
                "model_type": getattr(cfg, "model_type", None),
                "image_token_id": loaded.image_token_id,
                "end_of_turn_id": loaded.end_of_turn_id,
                "mm_tokens_per_image": getattr(cfg, "mm_tokens_per_image", None),
                "attn_implementation": _attn_of(cfg),
            },
            default=str,
        )
    )
