"""validate/bench open GGUF files through the same bounded header walk as inspect (issue 12)."""
from __future__ import annotations

import struct

import pytest

from converter.errors import ValidationError
from converter.quality.validate import open_gguf


def test_a_113_byte_gguf_declaring_2_to_the_40_elements_is_refused_before_gguf_py_allocates(tmp_path):
    key = b"general.x"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 4, 1 << 40)
    path = tmp_path / "arr.gguf"
    path.write_bytes(data + bytes(113 - len(data)))
    with pytest.raises(ValidationError) as e:
        open_gguf(path)
    assert str(e.value) == (f"{path}: not a readable GGUF file (the element count of the value of 'general.x' is "
                            "1099511627776, but 56 bytes cannot hold that many (at byte 57 of 113))")


def test_a_file_without_the_magic_is_named(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValidationError) as e:
        open_gguf(path)
    assert str(e.value) == f"{path}: not a readable GGUF file (it does not start with the GGUF magic (starts with b'NOPE'))"
