"""Webdataset shards (plain tar files, img2dataset-compatible): find them, read them robustly, write them atomically.

A sample is the group of consecutive tar members sharing a key (`<key>.<ext>`): the image in jpg/jpeg/png/webp, the
caption in txt, optional metadata in json (a dict). Reading is done with `tarfile` rather than webdataset's
pipeline so that every bad sample can be skipped *and counted by reason* (webdataset's handlers only warn), and a
truncated tar is told apart from a complete one. The files stay readable by webdataset and img2dataset tooling.

Writing is deterministic (members sorted, mtime 0, fixed owner, json with sorted keys) and atomic (a `.tmp`
file renamed into place when complete), so a killed writer never leaves a half shard under the final name.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip.atomic import atomic_path
from blip.data.images import BadSample, decode_image
from blip.data.text import pre_caption
from blip.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image extensions a sample may carry, in order of preference (img2dataset writes jpg)."""

REASONS = {
    "missing_shard": "the shard file does not exist",
    "unreadable_shard": "the shard file cannot be opened",
    "truncated_tar": "the tar ends early or is corrupt (samples before the damage are kept)",
    "missing_image": "no jpg/jpeg/png/webp member (or, for annotation lists, no image file)",
    "empty_image": "the image has zero bytes",
    "undecodable_image": "the image bytes do not decode (corrupt, truncated, unknown format)",
    "unsupported_format": "the image decodes but is not JPEG, PNG or WebP (annotation-list conversion)",
    "absurd_size": "the image is tiny, enormous or absurdly thin",
    "missing_caption": "no txt member, json.caption or json.captions (caption and capfilt accept such samples)",
    "empty_caption": "every caption is empty after cleaning (pre_caption)",
    "bad_utf8": "the caption or json is not valid UTF-8",
    "bad_json": "the json member is not a JSON object",
    "bad_label": "the cls member is not an integer, or a json.labels entry is missing, not an integer or out of range "
    "(vision pre-training)",
    "duplicate_key": "the key appeared earlier in the same shard (CapFilt keeps the first)",
    "unsafe_key": "the sample key is absolute or has '..', '.', empty parts, a backslash or a control character "
    "(written out, it could name a file outside the output directory)",
}
"""Why a sample (or a whole shard) is skipped; the keys are what SampleStats counts."""

_NAME = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # webdataset's key/extension split: "dir/key.ext.s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def unsafe_key(key: str) -> str | None:
    """Why a sample key must not become a file or member name, or None when it is safe.

    A key may hold "/" (webdataset's sub-directories inside a tar), but every part must be a plain name: no
    "..", ".", empty part (so no leading "/"), backslash or control character (NUL included).
    """
    if not key:
        return "empty key"
    if _CONTROL.search(key):
        return "a backslash or control character"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "an absolute path or a '.', '..' or empty part"
    return None


# ---- finding shards ----------------------------------------------------------------------------------------------
def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths of a spec: a directory (its *.tar, sorted), a glob, a brace pattern `a/{00000..00099}.tar`, a
    file, or a list of those (concatenated, duplicates dropped).

    Brace patterns keep names that do not exist (readers count them as `missing_shard`) unless none exists.
    """
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not specs:
        raise InputError("no shards given")
    out: list[str] = []
    for s in specs:
        out.extend(_expand_one(os.path.expanduser(os.fspath(s))))
    return list(dict.fromkeys(out))


def _expand_one(spec: str) -> list[str]:
    if os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        if not tars:
            raise InputError(f"{spec}: no .tar shards in this directory")
        return tars
    if "{" in spec:
        from braceexpand import braceexpand

        names: list[str] = []
        for name in braceexpand(spec):
            names.extend(sorted(glob.glob(name)) if glob.has_magic(name) else [name])
        if not any(os.path.exists(n) for n in names):
            raise InputError(f"{spec}: no shard matches this pattern")
        return names
    if glob.has_magic(spec):
        found = sorted(glob.glob(spec))
        if not found:
            raise InputError(f"{spec}: no shard matches this pattern")
        return found
    if os.path.isfile(spec):
        return [spec]
    raise InputError(f"{spec}: no such shard file, directory or pattern")


# ---- accounting --------------------------------------------------------------------------------------------------
@dataclass
class SampleStats:
    """Good samples and bad ones by reason (see REASONS). Mergeable across shards, workers and ranks."""

    good: int = 0
    bad: Counter = field(default_factory=Counter)

    def add_bad(self, reason: str, n: int = 1) -> None:
        self.bad[reason] += n

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def merge(self, other: SampleStats | Mapping[str, int]) -> SampleStats:
        """Add `other` (a SampleStats or an `as_dict()`) into self; returns self."""
        if isinstance(other, SampleStats):
            self.good += other.good
            self.bad.update(other.bad)
        else:
            for k, v in other.items():
                if k == "good":
                    self.good += v
                elif k != "bad" and v:
                    self.bad[k] += v
        return self

    def as_dict(self) -> dict[str, int]:
        """`{"good": n, "bad": total, <reason>: count, ...}` (reasons sorted, zero counts left out)."""
        return {"good": self.good, "bad": self.total_bad, **{k: v for k, v in sorted(self.bad.items()) if v}}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> SampleStats:
        return cls().merge(d)

    def drain(self) -> dict[str, int]:
        """as_dict(), then reset to zero: how loader workers ship their counts as deltas."""
        d = self.as_dict()
        self.good, self.bad = 0, Counter()
        return d

    def summary(self) -> str:
        """One line for logs: `1200 good samples, 3 bad skipped (2 undecodable_image, 1 truncated_tar)`."""
        s = f"{self.good} good samples"
        if self.total_bad:
            why = ", ".join(f"{v} {k}" for k, v in sorted(self.bad.items(), key=lambda kv: (-kv[1], kv[0])) if v)
            s += f", {self.total_bad} bad skipped ({why})"
        return s


def _reject(stats: SampleStats, strict: bool, where: str, reason: str, detail: str) -> None:
    if strict:
        raise InputError(f"{where}: {reason} ({detail})" if detail else f"{where}: {reason}")
    stats.add_bad(reason)


# ---- validation ----------------------------------------------------------------------------------------------
def _caption_texts(meta: dict) -> list[str]:
    caps = meta.get("captions")
    if not isinstance(caps, list):
        return []
    texts = [c.get("text") if isinstance(c, dict) else c for c in caps]
    return [t for t in texts if isinstance(t, str)]


def captions_of(sample: Mapping[str, Any]) -> list[str]:
    """Every caption a training pair should use: the texts of json.captions if present (CapFilt output, human
    multi-caption data), else the txt caption. Empty ones are left out."""
    texts = [t for t in _caption_texts(sample.get("json") or {}) if t.strip()]
    return texts or [sample["text"]]


def _scene_problem(scene: Any) -> str | None:
    """What is wrong with a json.scene (the demo world's record of an image, which CapFilt checks captions
    against), or None: an object whose `objects` is a list of objects with string color, shape, size, position."""
    if not isinstance(scene, dict):
        return f"json.scene: expected an object, got {type(scene).__name__}"
    objects = scene.get("objects", [])
    fields = ("color", "shape", "size", "position")
    if not isinstance(objects, list) or not all(
        isinstance(o, dict) and all(isinstance(o.get(f), str) for f in fields) for o in objects
    ):
        return "json.scene.objects: expected a list of objects with string color, shape, size and position"
    return None


def _validate(group: dict[str, bytes | int], decode: bool, need_caption: bool = True) -> dict[str, Any]:
    """A raw member group -> sample fields, or BadSample. Cheap checks (text) run before the image decode."""
    meta: dict = {}
    if "json" in group:
        try:
            meta = json.loads(bytes(group["json"]).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadSample("bad_utf8", f"json: {e}") from None
        except ValueError as e:
            raise BadSample("bad_json", str(e)) from None
        except RecursionError:  # nested deeper than the parser's recursion limit
            raise BadSample("bad_json", "nested too deeply") from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
        if "scene" in meta and (problem := _scene_problem(meta["scene"])):
            raise BadSample("bad_json", problem)
    candidates = _caption_texts(meta)
    if not candidates and isinstance(meta.get("caption"), str):  # img2dataset's copy of the caption column
        candidates = [meta["caption"]]
    if "txt" in group:
        try:
            txt = bytes(group["txt"]).decode("utf-8").lstrip("\ufeff").strip()
        except UnicodeDecodeError as e:
            raise BadSample("bad_utf8", f"txt: {e}") from None
        candidates.insert(0, txt)
    elif not candidates and need_caption:
        raise BadSample("missing_caption", "no txt member, json.caption or json.captions")
    text = next((t.strip() for t in candidates if pre_caption(t)), None)
    if text is None:
        if need_caption:
            raise BadSample("empty_caption", "every caption is empty after cleaning")
        text = ""  # an image-only sample: captioning and CapFilt need no text
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        raise BadSample("missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
    data = group[ext]
    image = None
    if decode:
        assert isinstance(data, bytes)
        image = decode_image(data)
    elif data == 0:  # decode=False stores member sizes
        raise BadSample("empty_image", "zero bytes")
    sample = {"image": image, "image_bytes": data if decode else None, "image_ext": ext, "text": text, "json": meta}
    if "cls" in group:  # an ImageNet-style class id (webdataset's .cls), for vision pre-training
        try:
            sample["cls"] = int(bytes(group["cls"]).decode("ascii").strip())
        except (UnicodeDecodeError, ValueError, TypeError):
            raise BadSample("bad_label", "cls: expected an integer class id") from None
    return sample


# ---- reading -----------------------------------------------------------------------------------------------------
def iter_shard(
    path: str | os.PathLike,
    stats: SampleStats,
    strict: bool = False,
    *,
    decode: bool = True,
    subset: tuple[int, int] | None = None,
    need_caption: bool = True,
) -> Iterator[dict[str, Any]]:
    """Read ONE tar sequentially; yield validated samples
    `{"key", "image" (PIL RGB), "image_bytes", "image_ext", "text", "json", "shard", "index"}`.

    Bad samples are skipped and counted in `stats` by reason; `strict=True` raises InputError naming the shard and
    key instead. A truncated or corrupt tar yields every sample before the damage and counts one `truncated_tar`
    (the sample being read when the tar ended is dropped: it may be incomplete). A missing file counts
    `missing_shard`.

    decode=False skips reading and decoding images (image and image_bytes are None): for counting and captions.
    need_caption=False yields image-only samples (no caption, or only empty ones) with text "" instead of counting
    them as missing_caption / empty_caption: for captioning and CapFilt, which need only the image.
    subset=(n, k) keeps only samples whose position in the shard is k modulo n (the others are neither read nor
    checked nor counted): how several readers share a shard.
    """
    path = os.fspath(path)
    for key, index, group in iter_groups(path, stats, strict, read_images=decode, subset=subset):
        try:
            if why := unsafe_key(key):
                raise BadSample("unsafe_key", why)
            sample = _validate(group, decode, need_caption)
        except BadSample as e:
            _reject(stats, strict, f"{path}: sample {key!r}", e.reason, e.detail)
            continue
        stats.good += 1
        yield {"key": key, **sample, "shard": path, "index": index}


def iter_groups(
    path: str | os.PathLike,
    stats: SampleStats,
    strict: bool = False,
    *,
    read_images: bool = True,
    subset: tuple[int, int] | None = None,
) -> Iterator[tuple[str, int, dict[str, bytes | int]]]:
    """The raw member groups of ONE tar, unvalidated: `(key, position in the shard, {ext: bytes})`.

    Shard-level damage is counted in `stats` as iter_shard does (missing_shard, unreadable_shard, truncated_tar:
    the group being read when the tar ended is not yielded); the samples themselves are neither checked nor
    counted. read_images=False stores an image member's size (an int) instead of its bytes. For tools that
    look at samples iter_shard would reject (blip.data.stats).
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the generator may be abandoned
    except FileNotFoundError:
        _reject(stats, strict, path, "missing_shard", "no such file")
        return
    except OSError as e:
        _reject(stats, strict, path, "unreadable_shard", str(e))
        return
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:*")
        except (tarfile.TarError, EOFError, OSError) as e:
            _reject(stats, strict, path, "truncated_tar", f"not a readable tar: {e}")
            return
        index = -1
        key: str | None = None
        group: dict[str, bytes | int] = {}

        def owned(i: int) -> bool:
            return subset is None or i % subset[0] == subset[1]

        damage = None
        while True:
            try:
                member = tf.next()
                if member is None:
                    damage = _end_damage(f, tf)
                    break
                m = _NAME.match(member.name) if member.isfile() else None
                if m is None:
                    continue
                mkey, ext = m.group(1), m.group(2).lower()
                if mkey != key:
                    if key is not None and owned(index):
                        yield key, index, group
                    key, group, index = mkey, {}, index + 1
                if owned(index) and (read_images or ext not in IMAGE_EXTS):
                    fobj = tf.extractfile(member)
                    group[ext] = fobj.read() if fobj is not None else b""
                else:
                    group[ext] = member.size
            except (tarfile.TarError, EOFError, OSError) as e:
                damage = f"{type(e).__name__}: {e}"
                break
        if damage is not None:
            where = f"{path}: at sample {key!r}" if key is not None else path
            _reject(stats, strict, where, "truncated_tar", damage)
        elif key is not None and owned(index):
            yield key, index, group


def _end_damage(f: Any, tf: tarfile.TarFile) -> str | None:
    """tarfile stops quietly at a cut between members; a complete plain tar has a zero block where it stopped."""
    if tf.fileobj is not f:  # compressed: the decompressor reports truncation itself
        return None
    f.seek(tf.offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE:
        return None
    return "no end-of-archive marker (the file was cut between members or is corrupt)"


def stable_id(text: str) -> int:
    """A 63-bit id of a string, the same in every process and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def sample_image_id(sample: Mapping[str, Any]) -> int:
    """json.image_id when it is an int (or digits), else a stable hash of it, else of the sample key."""
    v = (sample.get("json") or {}).get("image_id")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    return stable_id(str(v) if v is not None else f"key:{sample['key']}")


# ---- writing -----------------------------------------------------------------------------------------------------
def encode_sample(sample: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """A webdataset-style dict (`__key__` plus extension -> bytes | str | dict/list for json) -> sorted tar
    members. Keys starting with "_" other than `__key__` are not written."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"bad sample __key__ {key!r}: a non-empty string without '.' in its last part")
    if why := unsafe_key(key):  # never write a member name that extracts outside the directory
        raise ValueError(f"unsafe sample __key__ {key!r}: {why}")
    members = []
    for ext in sorted(sample):
        if ext.startswith("_"):
            continue
        v = sample[ext]
        if isinstance(v, bytes | bytearray | memoryview):
            data = bytes(v)
        elif isinstance(v, str):
            data = v.encode("utf-8")
        elif isinstance(v, dict | list) and ext.endswith("json"):
            data = json.dumps(v, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        else:
            raise ValueError(f"sample {key!r}: field {ext!r} is a {type(v).__name__}; expected bytes or str")
        members.append((f"{key}.{ext}", data))
    return members


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o444  # no timestamps: same samples, same bytes
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


class ShardWriter:
    """Write samples into numbered shards (`pattern % i`, e.g. "out/web-%05d.tar") of at most `maxcount` samples
    and about `maxsize` bytes. Each shard is written to `<name>.tmp` and renamed when complete; on an exception
    inside `with`, the unfinished shard is deleted. `shards` lists the finished paths."""

    def __init__(self, pattern: str, maxcount: int = 1000, maxsize: int | None = None, start: int = 0):
        if maxcount < 1:
            raise ValueError(f"maxcount must be at least 1, got {maxcount}")
        self.pattern, self.maxcount, self.maxsize = pattern, maxcount, maxsize
        self.index = start
        self.shards: list[str] = []
        self._tf: tarfile.TarFile | None = None
        self._path = self._tmp = ""
        self._count = self._size = 0

    def _open(self) -> None:
        self._path = self.pattern % self.index
        self.index += 1
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path + ".tmp"
        self._tf = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._size = 0

    def write(self, sample: Mapping[str, Any]) -> None:
        members = encode_sample(sample)
        size = sum(len(d) for _, d in members)
        full = self._count >= self.maxcount or (self.maxsize is not None and self._size + size > self.maxsize)
        if self._tf is not None and full and self._count:
            self._finish()
        if self._tf is None:
            self._open()
        assert self._tf is not None
        for name, data in members:
            _add_member(self._tf, name, data)
        self._count += 1
        self._size += size

    def _finish(self) -> None:
        assert self._tf is not None
        self._tf.close()
        self._tf = None
        os.replace(self._tmp, self._path)
        self.shards.append(self._path)

    def close(self) -> list[str]:
        if self._tf is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._tf is not None:
            self._tf.close()
            self._tf = None
            Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write every sample into one tar at `path`, atomically (blip.atomic); returns the count.

    Deterministic bytes: members sorted per sample, mtime 0, fixed owner, json with sorted keys.
    """
    n = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for sample in samples:
            for name, data in encode_sample(sample):
                _add_member(tf, name, data)
            n += 1
    return n
