"""What identifies a run's configuration (core: dicts in, dicts and hashes out): the part of a run's config its
checkpoints must match, its hash, and which keys two configs differ in.

A run directory checks a resume against it (``align.train.run_dir``) and a study groups its cells into packs by it
(``align.train.config.pack_key``); both see the config as the dict config.yaml holds.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from align.common.files import json_safe
from align.optim.registry import HASHED_WHEN_UNSET, METHOD_HPARAMS

# Where a run lives, what runs it and which trackers it reports to: a checkpoint need not match these (a run
# resumed with another --report-to is the same run).
HASH_EXCLUDED = ("out_dir", "device", "report_to", "report_group")
# Keys added after runs were first trained (their paths in the config dict), left out of the hash while they hold
# their defaults: a run trained before they existed keeps its config_hash and still resumes.
HASH_NEW_DEFAULTS = {("loss", "local"): False, ("optim", "perturbation"): "global", ("eval", "sharpness_final"): True,
                     ("uniform_plateau_tol",): 0.05, ("collapse_fraction",): 0.1, ("loss", "block_rows"): None,
                     ("schedule", "order"): "random", ("schedule", "block_rows"): 8192,
                     ("head", "activation"): "gelu", ("head", "rescale"): 1.0, ("eval", "sharpness_geometries"): [],
                     **{("optim", name): None for name in METHOD_HPARAMS if name not in HASHED_WHEN_UNSET}}


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a config dict in canonical JSON: what a checkpoint must match to resume."""
    return hashlib.sha256(json.dumps(json_safe(config), sort_keys=True).encode()).hexdigest()[:16]


def hashed_view(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's config (a dict as config.yaml holds it) that its checkpoints must match: all but
    ``HASH_EXCLUDED``, and the ``HASH_NEW_DEFAULTS`` keys only where they differ from their defaults."""
    data = {k: v for k, v in config.items() if k not in HASH_EXCLUDED}
    for path, default in HASH_NEW_DEFAULTS.items():
        data = _without_default(data, path, default)
    return data


def _without_default(data: dict[str, Any], path: tuple[str, ...], default: Any) -> dict[str, Any]:
    """``data`` without the key at ``path`` when it holds ``default`` (unchanged otherwise)."""
    key, rest = path[0], path[1:]
    if key not in data:
        return data
    if rest:
        part = data[key]
        return {**data, key: _without_default(part, rest, default)} if isinstance(part, dict) else data
    return {k: v for k, v in data.items() if k != key} if data[key] == default else data


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for 'another configuration' messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if json_safe(a) == json_safe(b) else [prefix.rstrip(".")]
