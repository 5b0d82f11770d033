"""Webdataset tar shards (img2dataset's layout: ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per sample), read one
shard at a time and never indexed as a whole (edge layer).

A split's shards come from a PATTERN (a path, a glob, or brace notation ``/data/{00000..00331}.tar``) per split,
or from one pattern plus ``subset``: each sample goes to a split by a hash of its key and the seed, so the splits
are disjoint, deterministic and need no index. ``samples`` streams one tar through the ``webdataset`` package's
tar reader, grouping members by key as ``webdataset`` does; a sample that cannot be used (no image member, no
caption, a key seen before in the shard, the damaged tail of a truncated tar) comes out with its ``problem`` so
the cache skips and lists it (or fails with ``--strict``); an image that does not decode is found where it is
decoded. The cache key holds each shard's name, size and mtime (or its sha256 with ``content_hash``).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from braceexpand import braceexpand

from align.common.config import shorten
from align.common.errors import AlignError
from align.common.files import sha256_file

IMAGE_KEYS = "jpg;png;webp"  # img2dataset's image members, first present wins
CAPTION_KEY = "txt"  # img2dataset's caption member; "json:FIELD" reads a field of KEY.json (a list: several)
FLAT_SPLIT = "train"  # what one pattern without subset is (as a flat image folder is)


@dataclass(frozen=True)
class TarSample:
    """One sample of a shard: its position among the split's samples of the shard, key, image bytes, captions, and
    why it is skipped (None: usable so far; the image may still fail to decode) with the kind of problem."""

    index: int
    key: str
    image: bytes | None
    captions: list[str]
    problem: str | None = None
    kind: str | None = None  # one of SKIP_KINDS


# Why a sample is skipped (its ``kind`` in the manifest), and the embed summary's words for it, in this order.
SKIP_KINDS = {"image": "without a readable image", "caption": "without a caption", "duplicate": "duplicate key",
              "damaged": "damaged tar"}


@dataclass
class _Group:
    """Members of one key being gathered from the tar stream."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    duplicate: bool = False


@dataclass(frozen=True)
class WebDatasetSource:
    """A ``webdataset`` spec: shard patterns, member keys, the subset rule and the caption selection."""

    shards: str | dict[str, str]
    image_key: str = IMAGE_KEYS
    caption_key: str = CAPTION_KEY
    subset: dict[str, float] | None = None  # one pattern split by key hash: {split: fraction}
    subset_seed: int = 0
    content_hash: bool = False  # key the cache by each shard's sha256 instead of name, size and mtime
    caption_index: int | None = None

    def shard_paths(self, split: str) -> list[Path]:
        """The split's tar files in pattern order; AlignError for a split without a pattern, a missing path or a
        glob that matches nothing."""
        return [Path(p) for p in expand_pattern(self._pattern(split))]

    def identity(self, split: str) -> dict[str, Any]:
        """What changes the split's samples: each shard's name with size and mtime (or sha256), keys and subset."""
        shards = []
        for path in self.shard_paths(split):
            st = path.stat()
            shards.append([path.name, sha256_file(path)] if self.content_hash
                          else [path.name, st.st_size, st.st_mtime_ns])
        return {"split": split, "shards": shards, "image_key": self.image_key, "caption_key": self.caption_key,
                "subset": self.subset, "subset_seed": self.subset_seed if self.subset else None}

    def samples(self, path: Path, split: str) -> Iterator[TarSample]:
        """The split's samples of one tar, in tar order, read as a stream (one sample in memory at a time)."""
        from webdataset.tariterators import base_plus_ext, tar_file_iterator  # heavy: imports torch and friends

        index, seen, group = 0, set(), None
        try:
            with open(path, "rb") as fh:
                for member in tar_file_iterator(fh):
                    key, suffix = base_plus_ext(member["fname"])
                    if key is None:
                        continue
                    suffix = suffix.lower()
                    if group is not None and key == group.key and suffix not in group.members:
                        group.members[suffix] = member["data"]
                        continue
                    if group is not None and self.in_split(group.key, split):
                        yield self._sample(group, index)
                        index += 1
                    group = _Group(key, {suffix: member["data"]}, duplicate=key in seen)
                    seen.add(key)
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            where = group.key if group is not None else f"{path.name}@{index}"
            yield TarSample(index, where, None, [], f"{path.name} is truncated or damaged here ({shorten(str(exc), 80)})"
                                                    f": the rest of the shard is skipped", "damaged")
            return
        if group is not None and self.in_split(group.key, split):
            yield self._sample(group, index)

    def in_split(self, key: str, split: str) -> bool:
        """Whether sample ``key`` belongs to ``split``: always without subset; else by a hash of (seed, key) cut
        into the subset's fractions, splits taken in name order."""
        if not self.subset:
            return True
        digest = hashlib.sha256(f"{self.subset_seed}\0{key}".encode()).digest()
        u, start = int.from_bytes(digest[:8], "big") / 2.0 ** 64, 0.0
        for name in sorted(self.subset):
            if start <= u < start + self.subset[name]:
                return name == split
            start += self.subset[name]
        return False

    def _pattern(self, split: str) -> str:
        if isinstance(self.shards, dict):
            if split not in self.shards:
                raise AlignError(f"webdataset shards have no pattern for split {split!r} (give shards.{split}, or "
                                 f"one pattern with subset)")
            return self.shards[split]
        if self.subset is not None:
            if split not in self.subset:
                raise AlignError(f"webdataset subset has no split {split!r}: give subset.{split} a fraction")
            return self.shards
        if split != FLAT_SPLIT:
            raise AlignError(f"one webdataset pattern without subset is the split {FLAT_SPLIT!r}, not {split!r}: give "
                             f"shards per split, or subset fractions")
        return self.shards

    def _sample(self, group: _Group, index: int) -> TarSample:
        """A gathered key as a sample: its image member and captions, or the problem that skips it."""
        image_ext = next((ext for ext in self.image_key.split(";") if ext in group.members), None)
        image = group.members.get(image_ext) if image_ext else None
        if group.duplicate:
            return TarSample(index, group.key, None, [], f"duplicate key {group.key!r} in the shard (kept the first)",
                             "duplicate")
        captions, problem = self._captions(group)
        if problem is not None:
            return TarSample(index, group.key, image, captions, problem, "caption")
        if image is None:
            found = ", ".join(sorted(group.members)) or "nothing"
            return TarSample(index, group.key, None, captions, f"no image member ({self.image_key}; found {found})",
                             "image")
        return TarSample(index, group.key, image, captions)

    def _captions(self, group: _Group) -> tuple[list[str], str | None]:
        """The sample's selected captions, or ([], why none)."""
        ext, _, field_name = self.caption_key.partition(":")
        raw = group.members.get(ext)
        if raw is None:
            return [], f"no caption member {ext!r}"
        try:
            value: Any = raw.decode("utf-8")
            if field_name:
                value = json.loads(value).get(field_name)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            return [], f"caption member {ext!r} does not decode ({type(exc).__name__})"
        texts = value if isinstance(value, list) else [value]
        captions = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        if not captions:
            return [], f"no caption in {self.caption_key!r}"
        if self.caption_index is not None:
            if len(captions) <= self.caption_index:
                return [], f"{len(captions)} caption(s); caption_index={self.caption_index} needs more"
            captions = [captions[self.caption_index]]
        return captions, None


def expand_pattern(pattern: str) -> list[str]:
    """A shard pattern's files: brace notation expanded, each part a path or a glob (sorted); one AlignError line
    for a path that does not exist or a glob that matches no file."""
    found: list[str] = []
    for part in braceexpand(os.path.expanduser(pattern)):
        if glob.has_magic(part):
            matches = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not matches:
                raise AlignError(f"webdataset shard pattern {shorten(part, 120)} matches no file: check the path")
            found += matches
        elif not os.path.isfile(part):
            raise AlignError(f"webdataset shard {shorten(part, 120)} not found: check the path (or the {{a..b}} "
                             f"range in the pattern)")
        else:
            found.append(part)
    return found
