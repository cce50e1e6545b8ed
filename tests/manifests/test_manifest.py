"""manifests: schema validation, strict loading, deterministic dumping, path safety, SHA256SUMS."""
from __future__ import annotations

import hashlib
import json
import subprocess

import jsonschema
import pytest

from manifests import (
    ChecksumsFormatError,
    Manifest,
    SchemaError,
    UnsafePathError,
    check_relative_path,
    dump_manifest,
    format_sha256sums,
    load_manifest,
    parse_sha256sums,
    resolve_inside,
)
from manifests.manifest import manifest_from_json
from manifests.schema import manifest_schema, validate


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def sample_doc() -> dict:
    return {
        "manifest_version": 1,
        "tool": {"name": "flux-gguf", "version": "0.1.0"},
        "name": "tiny-flux",
        "spec": {"name": "tiny-flux", "source": "tiny.safetensors", "variants": ["Q8_0"]},
        "sources": [{"name": "tiny.safetensors", "size": 1000, "sha256": _sha("src")}],
        "artifacts": [
            {"path": "tiny-flux-Q8_0.gguf", "size": 4096, "sha256": _sha("gguf"), "kind": "gguf",
             "variant": "Q8_0", "file_type": 7, "tensors": [
                 {"name": "a.weight", "type": "Q8_0", "shape": [4, 32], "offset": 1024, "nbytes": 136, "sha256": _sha("a")},
                 {"name": "a.bias", "type": "F32", "shape": [4], "offset": 1184, "nbytes": 16, "sha256": _sha("b")},
             ]},
            {"path": "README.md", "size": 10, "sha256": _sha("readme"), "kind": "model-card"},
            {"path": "docs/LICENSE.md", "size": 20, "sha256": _sha("license"), "kind": "extra"},
        ],
    }


def _bytes(doc: dict) -> bytes:
    return json.dumps(doc).encode()


# --- the schema file itself ------------------------------------------------------------------

def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(manifest_schema())


def test_sample_loads_into_typed_manifest():
    m = load_manifest(_bytes(sample_doc()))
    assert isinstance(m, Manifest)
    assert (m.name, m.tool_name, m.tool_version, m.manifest_version) == ("tiny-flux", "flux-gguf", "0.1.0", 1)
    assert [a.path for a in m.artifacts] == ["tiny-flux-Q8_0.gguf", "README.md", "docs/LICENSE.md"]
    gguf = m.artifact("tiny-flux-Q8_0.gguf")
    assert gguf.kind == "gguf" and gguf.variant == "Q8_0" and gguf.file_type == 7
    assert gguf.tensors[0].shape == (4, 32) and gguf.tensors[1].type == "F32"
    assert m.artifact("README.md").tensors is None
    assert m.ggufs == (gguf,)
    assert m.sources[0].name == "tiny.safetensors"


def test_load_from_path(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_bytes(_bytes(sample_doc()))
    assert load_manifest(p) == load_manifest(_bytes(sample_doc()))


def test_dump_is_deterministic_and_round_trips():
    m = load_manifest(_bytes(sample_doc()))
    data = dump_manifest(m)
    assert data == dump_manifest(load_manifest(data))
    assert json.loads(data) == sample_doc()
    assert data.endswith(b"}\n")
    # one tensor per line keeps big manifests reviewable
    assert b'{"name": "a.weight", "type": "Q8_0", "shape": [4, 32], "offset": 1024' in data


def test_created_is_optional_and_checked():
    doc = sample_doc()
    doc["created"] = "2024-01-02T03:04:05Z"
    assert load_manifest(_bytes(doc)).created == "2024-01-02T03:04:05Z"
    doc["created"] = "yesterday"
    with pytest.raises(SchemaError, match=r"created: expected a string matching"):
        load_manifest(_bytes(doc))


# --- invalid documents: exact messages, and jsonschema agrees on the schema-level ones ----------

def _mutate(path: list, value=None, delete=False):
    def apply(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return doc
    return apply


SCHEMA_CASES = [
    (_mutate(["manifest_version"], 0), "manifest.json: manifest_version: expected 1, got 0"),
    (_mutate(["tool"], delete=True), "manifest.json: (top level): missing required key 'tool'"),
    (_mutate(["surprise"], True), "manifest.json: (top level): unexpected key 'surprise' (expected only"),
    (_mutate(["sources"], []), "manifest.json: sources: expected at least 1 item(s), got 0"),
    (_mutate(["artifacts", 0, "size"], -1), "manifest.json: artifacts[0].size: expected a value >= 0, got -1"),
    (_mutate(["artifacts", 0, "size"], 1.5), "manifest.json: artifacts[0].size: expected integer, got number 1.5"),
    (_mutate(["artifacts", 0, "size"], True), "manifest.json: artifacts[0].size: expected integer, got boolean true"),
    (_mutate(["artifacts", 1, "sha256"], "ABC"), "manifest.json: artifacts[1].sha256: expected a string matching ^[0-9a-f]{64}$, got 'ABC'"),
    (_mutate(["artifacts", 0, "tensors", 1, "shape"], []), "manifest.json: artifacts[0].tensors[1].shape: expected at least 1 item(s), got 0"),
    (_mutate(["artifacts", 0, "tensors", 0, "type"], "q8_0"), "manifest.json: artifacts[0].tensors[0].type: expected a string matching"),
    (_mutate(["artifacts", 2, "kind"], "Bad Kind"), "manifest.json: artifacts[2].kind: expected a string matching"),
    (_mutate(["spec"], []), "manifest.json: spec: expected object, got array []"),
]


@pytest.mark.parametrize(("mutate", "message"), SCHEMA_CASES)
def test_schema_violations_name_the_location(mutate, message):
    doc = mutate(sample_doc())
    with pytest.raises(SchemaError) as e:
        load_manifest(_bytes(doc))
    assert str(e.value).startswith(message)
    # The hand-written validator and the reference implementation agree.
    assert not jsonschema.Draft202012Validator(manifest_schema()).is_valid(doc)


def test_reference_validator_accepts_what_we_accept():
    jsonschema.Draft202012Validator(manifest_schema()).validate(sample_doc())
    validate(sample_doc())


RULE_CASES = [
    (_mutate(["artifacts", 1, "path"], "tiny-flux-Q8_0.gguf"), "artifacts[1].path: 'tiny-flux-Q8_0.gguf' is listed twice"),
    (_mutate(["artifacts", 1, "path"], "TINY-flux-Q8_0.gguf"), "artifacts[1].path: 'TINY-flux-Q8_0.gguf' is listed twice (or differs from 'tiny-flux-Q8_0.gguf' only by case)"),
    (_mutate(["artifacts", 1, "path"], "manifest.json"), "artifacts[1].path: 'manifest.json' is reserved"),
    (_mutate(["artifacts", 1, "path"], "SHA256SUMS"), "artifacts[1].path: 'SHA256SUMS' is reserved"),
    (_mutate(["artifacts", 1, "path"], "docs"), "artifacts: 'docs' is listed as a file and as a folder of other files"),
    (_mutate(["artifacts", 0, "tensors"], delete=True), "artifacts[0]: a gguf artifact needs 'tensors'"),
    (_mutate(["artifacts", 0, "tensors", 1, "name"], "a.weight"), "artifacts[0].tensors[1].name: tensor 'a.weight' is listed twice"),
    (_mutate(["artifacts", 0, "tensors", 1, "offset"], 4090), "artifacts[0].tensors[1]: tensor 'a.bias' ends at byte 4106, past the file size 4096"),
]


@pytest.mark.parametrize(("mutate", "message"), RULE_CASES)
def test_rules_beyond_the_schema(mutate, message):
    with pytest.raises(SchemaError) as e:
        load_manifest(_bytes(mutate(sample_doc())))
    assert str(e.value).startswith("manifest.json: " + message)


@pytest.mark.parametrize(("path", "reason"), [
    ("/etc/passwd", "absolute paths are not allowed"),
    ("../outside.gguf", "'..' components are not allowed"),
    ("a/../../b", "'..' components are not allowed"),
    ("./a", "'.' components are not allowed"),
    ("a//b", "empty path component ('//' or trailing '/')"),
    ("a/", "empty path component ('//' or trailing '/')"),
    ("C:/x", "drive-qualified paths are not allowed"),
    ("a\\..\\b", "contains a backslash"),
    ("a\nb", "contains a newline"),
    ("a\0b", "contains a NUL byte"),
])
def test_unsafe_artifact_paths_are_rejected(path, reason):
    doc = _mutate(["artifacts", 1, "path"], path)(sample_doc())
    with pytest.raises(UnsafePathError) as e:
        load_manifest(_bytes(doc))
    assert e.value.path == path and e.value.reason == reason
    assert str(e.value) == f"unsafe path {path!r} in manifest: {reason}"


def test_strict_json():
    with pytest.raises(SchemaError, match=r"^manifest.json: not valid JSON: Expecting value at line 1 column 1$"):
        load_manifest(b"")
    with pytest.raises(SchemaError, match=r"duplicate key 'name'"):
        load_manifest(b'{"name": "a", "name": "b"}')
    with pytest.raises(SchemaError, match=r"NaN is not valid JSON"):
        load_manifest(b'{"x": NaN}')
    with pytest.raises(SchemaError, match=r"not UTF-8 text \(byte 1\)"):
        load_manifest(b'{\xff}')
    with pytest.raises(SchemaError, match=r"\(top level\): expected object, got array"):
        load_manifest(b"[]")


def test_newer_manifest_version_says_upgrade():
    doc = sample_doc()
    doc["manifest_version"] = 2
    with pytest.raises(SchemaError, match=r"manifest_version: version 2 is newer than this flux-gguf understands \(1\); upgrade flux-gguf"):
        manifest_from_json(doc)


def test_validator_refuses_unsupported_schema_keywords():
    with pytest.raises(ValueError, match=r"schema keyword\(s\) \['oneOf'\]"):
        validate({}, {"oneOf": []})


def test_dump_refuses_invalid_manifest():
    m = load_manifest(_bytes(sample_doc()))
    bad = Manifest(m.tool_name, m.tool_version, m.name, m.spec, m.sources, m.artifacts + (m.artifacts[1],))
    with pytest.raises(SchemaError, match="listed twice"):
        dump_manifest(bad)


# --- paths on disk -----------------------------------------------------------------------------

def test_resolve_inside_refuses_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "flink").symlink_to(tmp_path / "real" / "f")
    assert resolve_inside(tmp_path, "real/f") == tmp_path / "real" / "f"
    assert resolve_inside(tmp_path, "absent/f") == tmp_path / "absent" / "f"
    with pytest.raises(UnsafePathError, match=r"'link/f' in manifest: passes through symbolic link 'link'"):
        resolve_inside(tmp_path, "link/f")
    with pytest.raises(UnsafePathError, match=r"'flink' in manifest: is a symbolic link"):
        resolve_inside(tmp_path, "flink")


def test_check_relative_path_accepts_plain_paths():
    for p in ["a.gguf", "sub/dir/file.md", "weird name with spaces.gguf", "ünïcode.gguf", "..hidden", "a..b"]:
        assert check_relative_path(p) == p
    with pytest.raises(UnsafePathError, match="expected a string"):
        check_relative_path(3)


# --- SHA256SUMS --------------------------------------------------------------------------------

def test_sha256sums_format_is_sorted_and_parses_back():
    entries = {"b.gguf": _sha("b"), "README.md": _sha("r"), "a/x.md": _sha("x")}
    data = format_sha256sums(entries)
    lines = data.decode().splitlines()
    assert lines == [f"{_sha('r')}  README.md", f"{_sha('x')}  a/x.md", f"{_sha('b')}  b.gguf"]
    assert parse_sha256sums(data) == entries
    assert format_sha256sums([]) == b""


def test_sha256sums_passes_coreutils_strict(tmp_path):
    files = {"README.md": b"# card\n", "a b.gguf": b"\x00" * 1000, "sub/LICENSE.md": b"license"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    (tmp_path / "SHA256SUMS").write_bytes(format_sha256sums(sums))
    done = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(done.stdout.splitlines()) == ["README.md: OK", "a b.gguf: OK", "sub/LICENSE.md: OK"]
    # and what coreutils writes, we read
    made = subprocess.run(["sha256sum", *sorted(files)], cwd=tmp_path, capture_output=True, check=True).stdout
    assert parse_sha256sums(made) == sums


def test_sha256sums_refuses_bad_input():
    with pytest.raises(ValueError, match="must be 64 lowercase hex digits"):
        format_sha256sums({"a": "XYZ"})
    with pytest.raises(UnsafePathError):
        format_sha256sums({"../a": _sha("a")})
    with pytest.raises(ValueError, match="'a' is listed twice"):
        format_sha256sums([("a", _sha("a")), ("a", _sha("a"))])


@pytest.mark.parametrize(("data", "message"), [
    (b"nothex  a\n", "SHA256SUMS line 1: expected '<64 hex digits>  <relative path>'"),
    (f"{_sha('a')}  a\n\n".encode(), "SHA256SUMS line 2: expected '<64 hex digits>  <relative path>'"),
    (f"{_sha('a')}  a".encode(), "SHA256SUMS line 1: the last line does not end with a newline"),
    (f"{_sha('a')}  a\n{_sha('b')}  a\n".encode(), "SHA256SUMS line 2: 'a' is listed twice"),
    (f"{_sha('a')}  /etc/passwd\n".encode(), "SHA256SUMS line 1: path '/etc/passwd': absolute paths are not allowed"),
    (b"\xff\n", "SHA256SUMS line 1: not UTF-8 text"),
])
def test_sha256sums_parse_errors_name_the_line(data, message):
    with pytest.raises(ChecksumsFormatError) as e:
        parse_sha256sums(data)
    assert str(e.value) == message


def test_sha256sums_accepts_binary_marker_and_uppercase():
    assert parse_sha256sums(f"{_sha('a').upper()} *a.gguf\n".encode()) == {"a.gguf": _sha("a")}
