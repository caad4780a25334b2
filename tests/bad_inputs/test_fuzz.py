"""Bad-input battery: fuzzed weight files (every outcome a clean load or a loramerge error)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramerge.errors import (
    AdapterLoadError,
    NumericalError,
    UnsupportedAdapterError,
)

from .helpers import (
    CONFIG,
    WEIGHTS,
    read_all,
)

# ------------------------------------------------------------------------------------------------ fuzz


ALLOWED_ON_MUTATION = (AdapterLoadError, UnsupportedAdapterError, NumericalError)

def _fresh_dir(tmp_path_factory, config: bytes, weights: bytes) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / CONFIG).write_bytes(config)
    (d / WEIGHTS).write_bytes(weights)
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=2048))
def test_fuzz_random_bytes_are_a_load_error(pristine, tmp_path_factory, blob):
    d = _fresh_dir(tmp_path_factory, pristine[0], blob)
    with pytest.raises(AdapterLoadError) as info:
        read_all(d)
    assert str(d / WEIGHTS) in str(info.value) and info.value.fix


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_random_prefix_and_header_bytes(pristine, tmp_path_factory, data):
    """Random header-length prefix followed by random (often JSON-looking) header bytes."""
    n = data.draw(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(min_value=0, max_value=600))
    header = data.draw(st.binary(max_size=600) | st.text(alphabet='{}[]":,0123456789-eE.FBI_ dtypeshapdofsn',
                                                          max_size=300).map(str.encode))
    tail = pristine[1][-data.draw(st.integers(0, 256)):]
    d = _fresh_dir(tmp_path_factory, pristine[0], struct.pack("<Q", n) + header + tail)
    with pytest.raises(AdapterLoadError):
        read_all(d)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# Shapes and offsets that look almost right: negative, huge, float (inf, nan), bool or string entries.
NUMBER_LISTS = st.lists(st.integers(-2**40, 2**70) | st.floats() | st.booleans() | st.text(max_size=3), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_headers(pristine, tmp_path_factory, data):
    """Structured mutations of a valid header: every outcome is a clean load or a loramerge error."""
    raw = pristine[1]
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    keys = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(keys))
    mutation = data.draw(st.sampled_from(["field", "drop-field", "rename", "drop-tensor", "entry", "bytes"]))
    if mutation == "field":
        header[key][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON_VALUES
                                                                                                | NUMBER_LISTS)
    elif mutation == "drop-field":
        del header[key][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "rename":
        header[data.draw(st.text(max_size=40))] = header.pop(key)
    elif mutation == "drop-tensor":
        del header[key]
    elif mutation == "entry":
        header[key] = data.draw(JSON_VALUES)
    blob = json.dumps(header).encode()
    if mutation == "bytes":
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), min_size=1,
                                   max_size=8))
        mutable = bytearray(blob)
        for pos, value in flips:
            mutable[pos] = value
        blob = bytes(mutable)
    d = _fresh_dir(tmp_path_factory, pristine[0], struct.pack("<Q", len(blob)) + blob + body)
    try:
        deltas = read_all(d)
    except ALLOWED_ON_MUTATION as exc:
        assert exc.fix and str(d) in str(exc)
        return
    for delta in deltas.values():  # a mutation that kept the file valid must still give finite factors
        assert torch.isfinite(delta).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["shape", "data_offsets"]), value=NUMBER_LISTS, which=st.integers(0, 7))
def test_fuzz_shapes_and_offsets(pristine, tmp_path_factory, field, value, which):
    """Near-miss shapes and offsets (found: float('inf') in a shape used to escape as OverflowError)."""
    raw = pristine[1]
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    keys = sorted(k for k in header if k != "__metadata__")
    header[keys[which % len(keys)]][field] = value
    blob = json.dumps(header).encode()
    d = _fresh_dir(tmp_path_factory, pristine[0], struct.pack("<Q", len(blob)) + blob + body)
    try:
        read_all(d)
    except ALLOWED_ON_MUTATION as exc:
        assert exc.fix and str(d) in str(exc)
