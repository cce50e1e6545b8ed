"""The release manifest: typed model, strict loading, and deterministic serialization.

``load_manifest`` is the only way a manifest enters the program: strict JSON (no duplicate
keys, no NaN), the shipped JSON Schema, then the rules a schema cannot express (safe, unique
paths; GGUF artifacts carry their tensors; tensor ranges inside the file). ``dump_manifest``
writes the same bytes for the same content, so two builds of one spec are byte-identical.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import SchemaError
from .paths import check_relative_path, name_key, twin_difference
from .schema import validate

MANIFEST_NAME = "manifest.json"
CHECKSUMS_NAME = "SHA256SUMS"
SIGNATURE_NAME = "model.sig"
"""The OpenSSF model-signing bundle of a signed release (covers every file, itself excepted)."""
MANIFEST_VERSION = 1
RESERVED_NAMES = (MANIFEST_NAME, CHECKSUMS_NAME, SIGNATURE_NAME)
GGUF_KIND = "gguf"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF artifact: where its bytes lie in the file and their digest."""

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes, "sha256": self.sha256}


@dataclass(frozen=True)
class SourceEntry:
    """One file the release was derived from (name relative to the spec file)."""

    name: str
    size: int
    sha256: str
    hub: Mapping[str, str] | None = None  # streamed from the Hub: repo_id, revision, commit, path

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.hub is not None:
            out["hub"] = dict(self.hub)
        return out


@dataclass(frozen=True)
class ArtifactEntry:
    """One file of the release, by path relative to the release folder."""

    path: str
    size: int
    sha256: str
    kind: str
    variant: str | None = None
    file_type: int | None = None
    tensors: tuple[TensorEntry, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256, "kind": self.kind}
        if self.variant is not None:
            out["variant"] = self.variant
        if self.file_type is not None:
            out["file_type"] = self.file_type
        if self.tensors is not None:
            out["tensors"] = [t.to_json() for t in self.tensors]
        return out


@dataclass(frozen=True)
class Manifest:
    """A validated release manifest (see ``manifest.schema.json``)."""

    tool_name: str
    tool_version: str
    name: str
    spec: dict[str, Any]
    sources: tuple[SourceEntry, ...]
    artifacts: tuple[ArtifactEntry, ...]
    created: str | None = None
    manifest_version: int = MANIFEST_VERSION
    signature: dict[str, Any] | None = None  # how the release is signed (SIGNATURE_NAME), or None: unsigned
    _by_path: dict[str, ArtifactEntry] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_path.update((a.path, a) for a in self.artifacts)

    def artifact(self, path: str) -> ArtifactEntry | None:
        return self._by_path.get(path)

    @property
    def ggufs(self) -> tuple[ArtifactEntry, ...]:
        return tuple(a for a in self.artifacts if a.kind == GGUF_KIND)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manifest_version": self.manifest_version,
            "tool": {"name": self.tool_name, "version": self.tool_version},
        }
        if self.created is not None:
            out["created"] = self.created
        out["name"] = self.name
        out["spec"] = self.spec
        out["sources"] = [s.to_json() for s in self.sources]
        out["artifacts"] = [a.to_json() for a in self.artifacts]
        if self.signature is not None:
            out["signature"] = self.signature
        return out


def _reject_duplicates(source: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise SchemaError(source, "", f"duplicate key {key!r} (parsers would disagree on its value)")
            out[key] = value
        return out
    return hook


def _reject_constant(source: str):
    def hook(name: str) -> Any:
        raise SchemaError(source, "", f"{name} is not valid JSON")
    return hook


def parse_json(data: bytes, source: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(source, "", f"not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates(source),
                          parse_constant=_reject_constant(source))
    except json.JSONDecodeError as e:
        raise SchemaError(source, "", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise SchemaError(source, "", "JSON nested too deeply") from None
    except SchemaError:  # raised by our own hooks (a duplicate key, NaN): already says what and where
        raise
    except ValueError as e:  # an integer beyond Python's digit limit
        raise SchemaError(source, "", f"not usable JSON: {str(e).split(';')[0]}") from None


def _check_rules(doc: dict[str, Any], source: str) -> None:
    """What the schema cannot say: path safety and uniqueness, GGUF fields, tensor ranges."""
    seen: dict[str, str] = {}
    paths = []
    for i, art in enumerate(doc["artifacts"]):
        where = f"artifacts[{i}]"
        path = check_relative_path(art["path"])
        if path in RESERVED_NAMES:
            raise SchemaError(source, f"{where}.path", f"{path!r} is reserved (the manifest does not list itself or {CHECKSUMS_NAME})")
        folded = name_key(path)  # README.md and readme.md are one file on macOS and Windows; look-alikes confuse
        if folded in seen:
            other = seen[folded]
            raise SchemaError(source, f"{where}.path", f"{path!r} is listed twice" if other == path else
                              f"{path!r} is listed twice (or differs from {other!r} {twin_difference(path, other)})")
        seen[folded] = path
        paths.append(path)
        if art["kind"] == GGUF_KIND:
            for key in ("variant", "file_type", "tensors"):
                if key not in art:
                    raise SchemaError(source, where, f"a gguf artifact needs {key!r}")
        names: set[str] = set()
        for j, t in enumerate(art.get("tensors", ())):
            if t["name"] in names:
                raise SchemaError(source, f"{where}.tensors[{j}].name", f"tensor {t['name']!r} is listed twice")
            names.add(t["name"])
            if t["offset"] + t["nbytes"] > art["size"]:
                raise SchemaError(source, f"{where}.tensors[{j}]",
                                  f"tensor {t['name']!r} ends at byte {t['offset'] + t['nbytes']}, past the file size {art['size']}")
    folders = {name_key(q[: i + 1]) for q in paths for i, ch in enumerate(q) if ch == "/"}
    for p in paths:
        if name_key(p + "/") in folders:
            raise SchemaError(source, "artifacts", f"{p!r} is listed as a file and as a folder of other files")


def manifest_from_json(doc: Any, source: str = MANIFEST_NAME) -> Manifest:
    """Validate a parsed manifest document and build the typed :class:`Manifest`."""
    if isinstance(doc, dict) and isinstance(doc.get("manifest_version"), int) \
            and not isinstance(doc["manifest_version"], bool) and doc["manifest_version"] > MANIFEST_VERSION:
        raise SchemaError(source, "manifest_version",
                          f"version {doc['manifest_version']} is newer than this flux-gguf understands ({MANIFEST_VERSION}); upgrade flux-gguf")
    validate(doc, source=source)
    _check_rules(doc, source)
    artifacts = tuple(
        ArtifactEntry(
            path=a["path"], size=a["size"], sha256=a["sha256"], kind=a["kind"],
            variant=a.get("variant"), file_type=a.get("file_type"),
            tensors=None if "tensors" not in a else tuple(
                TensorEntry(t["name"], t["type"], tuple(t["shape"]), t["offset"], t["nbytes"], t["sha256"])
                for t in a["tensors"]),
        )
        for a in doc["artifacts"]
    )
    return Manifest(
        tool_name=doc["tool"]["name"], tool_version=doc["tool"]["version"], name=doc["name"],
        spec=doc["spec"], sources=tuple(SourceEntry(s["name"], s["size"], s["sha256"], s.get("hub"))
                                         for s in doc["sources"]),
        artifacts=artifacts, created=doc.get("created"), manifest_version=doc["manifest_version"],
        signature=doc.get("signature"),
    )


def load_manifest(path_or_bytes: str | os.PathLike[str] | bytes, *, source: str | None = None) -> Manifest:
    """Read and fully validate a manifest from a file path or from its bytes.

    Raises :class:`~manifests.errors.SchemaError` (bad JSON / schema) or
    :class:`~manifests.errors.UnsafePathError` (a path that could leave the release folder).
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        source = source or MANIFEST_NAME
    else:
        source = source or os.fspath(path_or_bytes)
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    return manifest_from_json(parse_json(data, source), source)


def _dump(value: Any, indent: int, inline: bool) -> str:
    if inline or not isinstance(value, (dict, list)) or not value:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    pad = "  " * (indent + 1)
    if isinstance(value, list):
        items = [pad + _dump(v, indent + 1, False) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    items = []
    for k, v in value.items():
        # One line per tensor keeps a 7,000-tensor manifest readable and diff-friendly.
        child_inline = k == "tensors" and isinstance(v, list)
        text = _dump_tensors(v, indent + 1) if child_inline else _dump(v, indent + 1, False)
        items.append(f"{pad}{json.dumps(k, ensure_ascii=False)}: {text}")
    return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"


def _dump_tensors(tensors: list[Any], indent: int) -> str:
    if not tensors:
        return "[]"
    pad = "  " * (indent + 1)
    return "[\n" + ",\n".join(pad + _dump(t, 0, True) for t in tensors) + "\n" + "  " * indent + "]"


def dump_manifest(manifest: Manifest) -> bytes:
    """Deterministic UTF-8 JSON bytes (validated first: never write a manifest we would reject)."""
    doc = manifest.to_json()
    validate(doc)
    _check_rules(doc, MANIFEST_NAME)
    return (_dump(doc, 0, False) + "\n").encode("utf-8")
