"""Run identity and per-invocation manifests (resolved config, versions, git commit, fingerprints)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError

PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "scipy", "pandas",
            "pyarrow", "hydra-core", "omegaconf", "opencv-python-headless", "pillow", "pydicom", "matplotlib")

# Config keys that define what a run's rows mean. Resuming a run directory with different values
# would mix incompatible rows, so it is refused (unless allow_config_change=true). Keys that only
# control how the work is done (stages, shards, limit, batch sizes, devices, methods to add) are
# not part of the identity.
IDENTITY_KEYS = (
    "seed",
    "dataset.name", "dataset.root", "dataset.path", "dataset.views", "dataset.splits", "dataset.findings",
    "dataset.one_image_per_study", "dataset.labeler", "dataset.seed", "dataset.n",
    "model.name_or_path", "model.revision", "model.dtype",
    "prompts",
    "generate.max_new_tokens",
)


PATH_KEYS = ("dataset.root", "dataset.path")  # compared as absolute paths


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The identity keys' values; dataset paths made absolute, so a run resumed from another
    working directory is recognised (and one pointing at other files is not)."""
    out = {k: OmegaConf.to_container(OmegaConf.select(cfg, k), resolve=True)
           if OmegaConf.is_config(OmegaConf.select(cfg, k)) else OmegaConf.select(cfg, k)
           for k in IDENTITY_KEYS}
    for k in PATH_KEYS:
        if isinstance(out.get(k), str) and out[k]:
            out[k] = os.path.abspath(os.path.expanduser(out[k]))
    return out


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None  # type: ignore[assignment]
    return out


def git_commit(repo: Path | None = None) -> dict[str, Any]:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": commit or None, "dirty": dirty if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _difference(key: str, was: Any, now: Any, limit: int = 120) -> str:
    """One identity key's change, short: the differing sub-keys of a mapping, values abridged."""
    if isinstance(was, dict) and isinstance(now, dict):
        subs = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        return "; ".join(_difference(f"{key}.{k}", was.get(k), now.get(k), limit) for k in subs)

    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    return f"{key}: run has {short(was)}, now {short(now)}"


def refuse_changed_identity(run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The run's manifest.json (None for a new run); ConfigError naming the keys when `cfg`
    changes what the run's rows mean (unless allow_config_change). Writes nothing."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return None
    ident = identity(cfg)
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(ident) | set(old.get("identity", {}))
                  if ident.get(k) != old.get("identity", {}).get(k))
    if diff and not cfg.allow_config_change:
        details = "; ".join(_difference(k, old["identity"].get(k), ident.get(k)) for k in diff)
        raise ConfigError(f"run_dir={run_dir} was made with a different configuration ({details}). "
                          "Use a new run_dir, or allow_config_change=true to resume anyway.")
    return old


def check_identity(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """Write run_dir/manifest.json on first use; on resume refuse a different identity config."""
    old = refuse_changed_identity(run_dir, cfg)
    if old is not None:
        return old
    ident = identity(cfg)
    manifest = {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "identity": ident,
                "config_hash": config_hash(ident)}
    write_json_atomic(run_dir / "manifest.json", manifest)
    return manifest


class InvocationManifest:
    """manifests/<time>-s<shard>-<pid>.json: everything needed to reproduce one invocation."""

    def __init__(self, run_dir: Path, cfg: DictConfig):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path = run_dir / "manifests" / f"{stamp}-s{cfg.dataset.shard:05d}-{os.getpid()}.json"
        self.data: dict[str, Any] = {
            "started_utc": stamp,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "config_hash": config_hash(identity(cfg)),
            "packages": package_versions(),
            "git": git_commit(),
            "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                     "cpus": os.cpu_count()},
            "argv": sys.argv,
            "stages": {},
        }
        self.save()

    def update(self, **items: Any) -> None:
        self.data.update(items)
        self.save()

    def stage(self, name: str, **info: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(info)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
