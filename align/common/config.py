"""Config plumbing shared by every command: strict pydantic models, YAML loading and ``--set`` overrides.

A train or compare config may name its ``data:`` section instead of holding it: ``data_from: embed/synthetic_offline``
(a packaged embed config, or a path to one relative to the config's folder). ``read_config`` replaces the reference
by that file's settings, so everything downstream (validation, ``--set data.x=...``, the config.yaml a run or a
study saves, config hashes, cache keys) sees the full section, exactly as if it had been copied in.

Each module owns the pydantic model of its own section (``EncoderSpec`` in encoders, ``TrainConfig`` in train,
...); this file only provides the strict base class, the number types every section uses (``Number``,
``Integer``: no booleans) and the loading/override/error-formatting rules, so that an unknown or mistyped key is
always one line naming the key and the valid ones.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Tag, ValidationError

from align.common.config_files import resolve_data_from
from align.common.errors import AlignError, shorten

M = TypeVar("M", bound=BaseModel)
DATA_FROM = "data_from"  # the key naming an embed config whose settings are the config's data: section


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


# The number types of every config field that holds a number (a test walks every model's fields to keep it so).
# pydantic's lax mode reads ``true`` as 1 or 1.0; these refuse booleans and are otherwise lax. Number keeps
# accepting strings because YAML 1.1 reads ``1e-3`` (no dot) as the string "1e-3"; Integer takes whole numbers.
Number = Annotated[float, BeforeValidator(_not_bool)]
Integer = Annotated[int, BeforeValidator(_not_bool)]
MAX_SEED = 2 ** 63  # torch.manual_seed takes seeds in [0, 2^63)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (``yaml.safe_load``), or an AlignError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise AlignError(f"config {path} is a directory: give a YAML file")
    if not path.is_file():
        raise AlignError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise AlignError(f"config {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}): "
                         "save it as UTF-8") from None
    except OSError as exc:
        raise AlignError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AlignError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise AlignError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping in config file ``path`` (``load_yaml``) with a ``data_from:`` reference replaced, in place, by
    ``data:`` holding the named embed config's settings; an AlignError naming the problem when the reference is
    combined with ``data:``, names no file, or names a file that is not an embed config."""
    raw = load_yaml(path)
    if DATA_FROM not in raw:
        return raw
    if "data" in raw:
        raise AlignError(f"{path}: give either data: or data_from:, not both")
    target = resolve_data_from(raw[DATA_FROM], path)
    section = load_yaml(target)
    named = f"{path}: data_from {raw[DATA_FROM]} ({target})"
    hint = "name an embed config, e.g. embed/synthetic_offline"
    if DATA_FROM in section:  # one level only: no chains, so no cycles
        raise AlignError(f"{named} uses data_from itself (a train or compare config, or a chain); {hint}")
    if "data" in section:
        raise AlignError(f"{named} is a train or compare config (it has a data: section); {hint}")
    if "dataset" not in section:
        raise AlignError(f"{named} is not an embed config (it has no dataset: section); {hint}")
    return {("data" if key == DATA_FROM else key): (section if key == DATA_FROM else value)
            for key, value in raw.items()}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` → (["train", "lr"], 0.001); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise AlignError(f"--set {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise AlignError(f"--set {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.sub=value`` override applied (type checks happen at validation)."""
    out = copy.deepcopy(data)
    for text in overrides or []:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise AlignError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _tagged_members(annotation: Any) -> dict[str, Any]:
    """{tag: member} of a tagged union (``Union[Annotated[X, Tag("x")], ...]``), else {}."""
    members = {}
    for arg in getattr(annotation, "__args__", ()):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, Tag):
                members[meta.tag] = arg.__origin__
    return members


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _key_path(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], type[BaseModel] | None]:
    """(``loc`` as the config's keys: without the member tags pydantic puts in the path of a tagged union, the model
    whose field the last key is, or None when unknown)."""
    keys: list[Any] = []
    owner: Any = model
    current: Any = model
    tags: dict[str, Any] = {}
    for part in loc:
        if part in tags:  # the member a tagged union chose: not a key of the config
            current, tags = tags[part], {}
            continue
        keys.append(part)
        owner, tags = current, {}
        fields = getattr(current, "model_fields", None)
        annotation = fields[part].annotation if fields is not None and part in fields else None
        tags = _tagged_members(annotation)
        current = None if tags or annotation is None else _model_of(annotation)
    return tuple(keys), owner if isinstance(owner, type) else None


# How pydantic names the member of a union a value failed, e.g. "function-before[_not_bool(), int]" in
# ``workers.function-before[_not_bool(), int]``: not a key, so left out of the key an error line names.
_UNION_MEMBER = re.compile(r"[a-z][a-z-]*\[.*\]")


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str = "config") -> str:
    """One line describing the first problem, naming the key and, for unknown keys, the valid ones."""
    err = exc.errors()[0]
    loc, owner = _key_path(model, tuple(p for p in err["loc"] if not _UNION_MEMBER.fullmatch(str(p))))
    key = ".".join(str(p) for p in loc) or "(root)"
    if err["type"] == "extra_forbidden":
        valid = sorted(getattr(owner, "model_fields", {}))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{source}: unknown key {key!r}{hint}; valid keys here: {', '.join(valid)}"
    value = err.get("input")
    if isinstance(value, (dict, list, BaseModel)):  # a whole section: the message names the problem, the key where
        return shorten(f"{source}: {key}: {err['msg']}")
    return shorten(f"{source}: {key}: {err['msg']} (got {shorten(repr(value), 80)})")


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """``model.model_validate(data)`` with pydantic's multi-line error turned into one AlignError line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise AlignError(format_validation_error(exc, model, source)) from None


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> M:
    """Load ``path`` (``read_config``: a ``data_from:`` is resolved) or ``defaults``, apply ``--set`` overrides and
    validate strictly into ``model``."""
    data = read_config(path) if path is not None else dict(defaults or {})
    return validate(model, apply_overrides(data, overrides), source=str(path or "config"))


def dump_config(config: BaseModel) -> str:
    """The config as YAML, re-loadable with ``load_config`` (used for every run's ``config.yaml``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
