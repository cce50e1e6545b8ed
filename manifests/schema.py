"""A small JSON Schema validator for the subset ``manifest.schema.json`` uses.

Why by hand rather than the ``jsonschema`` package: the manifest is checked on every ``verify``
and ``download`` and the schema uses a dozen keywords, so ~100 lines keep the runtime free of
three extra dependencies (jsonschema, referencing, rpds-py). Tests cross-check this validator
against ``jsonschema`` (a test-only dependency) on valid and damaged manifests.

Supported keywords: type, properties, required, additionalProperties, items, enum, const,
pattern, minimum, maximum, minLength, minItems, maxItems, $ref (local ``#/...`` pointers).
Any other keyword in a schema raises ``ValueError`` so the schema cannot silently outgrow it.
"""
from __future__ import annotations

import functools
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from .errors import SchemaError

SCHEMA_FILE = "manifest.schema.json"

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "$comment", "default", "examples"}
_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "pattern", "minimum", "maximum", "minLength", "minItems", "maxItems", "$ref",
} | _ANNOTATIONS

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The manifest JSON Schema shipped as package data."""
    text = resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _type_name(value: object) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object", "null"):
        if _is_type(value, name):
            return name
    return type(value).__name__


def _is_type(value: object, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False  # JSON true/false are not numbers, though Python bools are ints
    if name == "integer" and isinstance(value, float):
        return False
    return isinstance(value, _TYPES[name])


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Validator:
    def __init__(self, root: dict[str, Any], source: str):
        self.root = root
        self.source = source

    def fail(self, where: str, problem: str) -> None:
        raise SchemaError(self.source, where or "(top level)", problem)

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref pointers are supported, got {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def check(self, value: Any, schema: dict[str, Any], where: str) -> None:
        unknown = set(schema) - _KEYWORDS
        if unknown:
            raise ValueError(f"schema keyword(s) {sorted(unknown)} at {where or 'top level'} are not supported")
        if "$ref" in schema:
            self.check(value, self.resolve(schema["$ref"]), where)
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is_type(value, n) for n in names):
                self.fail(where, f"expected {' or '.join(names)}, got {_type_name(value)} {_short(value)}")
        if "const" in schema and not _json_equal(value, schema["const"]):
            self.fail(where, f"expected {_short(schema['const'])}, got {_short(value)}")
        if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
            self.fail(where, f"expected one of {', '.join(_short(e) for e in schema['enum'])}, got {_short(value)}")
        if isinstance(value, str):
            self._check_string(value, schema, where)
        elif _is_type(value, "number"):
            if "minimum" in schema and value < schema["minimum"]:
                self.fail(where, f"expected a value >= {schema['minimum']}, got {value}")
            if "maximum" in schema and value > schema["maximum"]:
                self.fail(where, f"expected a value <= {schema['maximum']}, got {value}")
        elif isinstance(value, list):
            self._check_array(value, schema, where)
        elif isinstance(value, dict):
            self._check_object(value, schema, where)

    def _check_string(self, value: str, schema: dict[str, Any], where: str) -> None:
        if "minLength" in schema and len(value) < schema["minLength"]:
            self.fail(where, f"expected a string of at least {schema['minLength']} character(s), got {_short(value)}")
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            self.fail(where, f"expected a string matching {schema['pattern']}, got {_short(value)}")

    def _check_array(self, value: list[Any], schema: dict[str, Any], where: str) -> None:
        if "minItems" in schema and len(value) < schema["minItems"]:
            self.fail(where, f"expected at least {schema['minItems']} item(s), got {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            self.fail(where, f"expected at most {schema['maxItems']} item(s), got {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                self.check(item, schema["items"], _join(where, i))

    def _check_object(self, value: dict[str, Any], schema: dict[str, Any], where: str) -> None:
        for key in schema.get("required", ()):
            if key not in value:
                self.fail(where, f"missing required key {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                self.check(item, props[key], _join(where, key))
            elif extra is False:
                self.fail(where, f"unexpected key {key!r} (expected only {', '.join(props)})")
            elif isinstance(extra, dict):
                self.check(item, extra, _join(where, key))


def _json_equal(a: object, b: object) -> bool:
    """Equality as JSON means it: ``True`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def validate(document: Any, schema: dict[str, Any] | None = None, *, source: str = "manifest.json") -> None:
    """Raise :class:`SchemaError` naming the first offending location if ``document`` does not match."""
    root = manifest_schema() if schema is None else schema
    _Validator(root, source).check(document, root, "")


@functools.lru_cache(maxsize=64)
def _pattern(pattern: str) -> "re.Pattern[str]":
    """A JSON Schema (ECMA-262) pattern as Python ``re``: there ``$`` matches only at the very end,
    while Python's also matches before a trailing newline (which let ``"<64 hex>\\n"`` pass)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)
