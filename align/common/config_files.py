"""The YAML configs that ship inside the package (align.configs): list them and resolve ``--config`` values.

A ``--config`` value is an existing file path, or the name of a packaged config: ``default``, ``compare/default``,
or the repository path a config's header names (``configs/compare/default.yaml``), which then works from any
folder once installed. An existing path always wins. A train or compare config's ``data_from:`` value names an
embed config the same way, or by a path relative to the config's own folder. No heavy imports: ``align configs``
and ``--help`` use this.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from align.common.errors import AlignError

KINDS = ("compare", "embed", "train", "datasets")


@dataclass(frozen=True)
class PackagedConfig:
    """One packaged YAML file: ``<kind>/<name>.yaml`` and the first descriptive line of its header comment."""

    kind: str
    name: str
    path: Path
    summary: str


def configs_root() -> Path:
    """The folder holding the packaged configs (configs/ in a checkout, align/configs/ when installed)."""
    # a plain folder in both cases (wheel or checkout); zip imports are not supported
    return Path(str(resources.files("align.configs")))


def _summary(path: Path) -> str:
    """The header's first line that is not a command (most headers open with the command that uses the file)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            return ""
        text = line.lstrip("#").strip()
        if text and not text.startswith("align "):
            return text
    return ""


def list_configs(kinds: tuple[str, ...] = KINDS) -> list[PackagedConfig]:
    """Every packaged config of ``kinds``, in the order of ``kinds`` then by name."""
    root = configs_root()
    return [PackagedConfig(kind, path.stem, path, _summary(path))
            for kind in kinds for path in sorted((root / kind).glob("*.yaml"))]


def packaged_config(kind: str, name: str) -> Path | None:
    """The file of packaged config ``kind/name``, or None when there is none."""
    path = configs_root() / kind / f"{name}.yaml"
    return path if kind in KINDS and path.is_file() else None


def find_packaged(text: str, kinds: tuple[str, ...]) -> Path | None:
    """The packaged config named by ``text``: ``name`` (searched in ``kinds`` order), ``kind/name`` or
    ``configs/kind/name.yaml`` (an explicit kind may be any kind); None when there is none."""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if parts[:1] == ("configs",):
        parts = parts[1:]
    stem = [p.removesuffix(".yaml").removesuffix(".yml") for p in parts]
    if len(stem) == 2:
        return packaged_config(*stem)
    if len(stem) == 1:
        return next((p for p in (packaged_config(kind, stem[0]) for kind in kinds) if p is not None), None)
    return None


def packaged_names(kinds: tuple[str, ...]) -> str:
    """The packaged configs of ``kinds`` for an error line: bare names for the first kind, ``kind/name`` after."""
    return ", ".join(c.name if c.kind == kinds[0] else f"{c.kind}/{c.name}" for c in list_configs(kinds))


def _shown(text: str) -> str:
    return text if len(text) <= 120 else text[:119] + "…"  # a value is echoed in one short error line


def resolve_config(value: str | Path, kinds: tuple[str, ...]) -> Path:
    """The YAML file meant by ``value``: an existing path, else a packaged ``name`` (searched in ``kinds`` order),
    ``kind/name`` or ``configs/kind/name.yaml``; anything else is an AlignError listing the names."""
    text = str(value)
    shown = _shown(text)
    path = Path(text).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise AlignError(f"--config {shown}: {exc.strerror}") from None
    if is_dir:
        raise AlignError(f"--config {shown} is a directory: give a YAML file or a config name (see `align configs`)")
    if is_file:
        return path
    found = find_packaged(text, kinds)
    if found is not None:
        return found
    raise AlignError(f"--config {shown}: no such file and no packaged config of that name; "
                     f"packaged: {packaged_names(kinds)} (or give a path)")


def resolve_data_from(value: object, referrer: str | Path) -> Path:
    """The embed config that ``data_from: value`` in the file ``referrer`` names: a path, relative to
    ``referrer``'s folder unless absolute, that exists; else a packaged embed config name as ``--config`` takes
    (``synthetic_offline``, ``embed/synthetic_offline``, ``configs/embed/synthetic_offline.yaml``)."""
    if not isinstance(value, str) or not value.strip():
        raise AlignError(f"{referrer}: data_from must name an embed config (a packaged name such as "
                         f"embed/synthetic_offline, or a path), got {_shown(repr(value))}")
    path = Path(referrer).parent / Path(value).expanduser()  # an absolute value replaces the folder
    try:
        if path.is_file():
            return path
    except OSError as exc:
        raise AlignError(f"{referrer}: data_from {_shown(value)}: {exc.strerror}") from None
    found = find_packaged(value, ("embed",))
    if found is not None:
        return found
    raise AlignError(f"{referrer}: data_from {_shown(value)}: no such file ({_shown(str(path))}) and no packaged "
                     f"embed config of that name; packaged: {packaged_names(('embed',))}")
