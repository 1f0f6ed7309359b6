"""Safetensors headers checked as the `safetensors` library checks them, without it.

A header the library would refuse (negative, boolean or float dimensions, byte ranges that
overlap, leave gaps or run past the data, a dtype whose size disagrees with the range,
JSON that its parser, serde_json, rejects) is refused here too, so that lrmerge never
merges from, or writes, a file that `safetensors` cannot load. `parse_header` is pure; the
reader in st_io adds the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import shown

FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
DTYPE_SIZES = {**FLOAT_DTYPES, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100_000_000  # safetensors' own limit on the header length


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # safetensors dtype code: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


class HeaderError(ValueError):
    """Why a safetensors header is invalid (read_header adds the file)."""


class _Object(list):
    """A JSON object as its (key, value) pairs: safetensors refuses some duplicate keys."""


U64 = 2**64  # safetensors sizes and offsets are u64: the header's numbers must fit
MAX_JSON_DEPTH = 127  # serde_json's nesting limit, which safetensors parses its header with
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _json_int(text: str) -> int | float:
    return -0.0 if text == "-0" else int(text)  # serde_json reads -0 as a float


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HeaderError("a number out of range")
    return value


def _no_constant(name: str) -> None:
    raise HeaderError(f"{name} is not JSON")


def _strict_json(text: str) -> Any:
    """Parse JSON as serde_json does (safetensors' parser): no NaN/Infinity, no lone
    surrogates; objects come back as _Object pairs. The values a header may hold have a fixed
    shallow shape; _check_json checks the nesting of the others (fields safetensors ignores)."""
    try:
        doc = json.loads(
            text,
            object_pairs_hook=_Object,
            parse_float=_json_float,
            parse_constant=_no_constant,
            parse_int=_json_int if "-0" in text else None,
        )  # the hook costs time: only when needed
    except HeaderError:
        raise
    except (ValueError, RecursionError):
        raise HeaderError("not JSON") from None
    if SURROGATE_ESCAPE.search(text):  # the text is UTF-8: only a \u escape can make a surrogate
        _check_json(doc, 1)
    return doc


def _check_json(value: Any, depth: int) -> None:
    """Refuse a lone surrogate in any string, or nesting past MAX_JSON_DEPTH levels (a value
    at `depth`, the header's top level being 1), as serde_json does."""
    stack = [(value, depth)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise HeaderError("a string with a lone surrogate") from None
        elif isinstance(value, list):
            if depth > MAX_JSON_DEPTH:
                raise HeaderError("nested too deeply")
            items = [x for pair in value for x in pair] if isinstance(value, _Object) else value
            stack.extend((x, depth + 1) for x in items)


def _u64_list(value: Any) -> list[int] | None:
    """A JSON array of unsigned 64-bit integers, else None (bools and floats are not)."""
    if type(value) is not list:
        return None
    for x in value:
        if type(x) is not int or not 0 <= x < U64:
            return None
    return value


def _tensor_entry(name: str, value: Any) -> tuple[TensorSpec, int, int]:
    if not isinstance(value, _Object):
        raise HeaderError(f"tensor {shown(name)} is not an object")
    fields: dict[str, Any] = {}
    for key, field_value in value:
        if key in ("dtype", "shape", "data_offsets"):
            if key in fields:
                raise HeaderError(f"tensor {shown(name)} has {key} twice")
            fields[key] = field_value
        elif isinstance(field_value, list):
            _check_json(field_value, 3)  # a field safetensors ignores, still parsed by serde_json
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in fields]
    if missing:
        raise HeaderError(f"tensor {shown(name)} has no {missing[0]}")
    dtype, shape, offsets = fields["dtype"], _u64_list(fields["shape"]), _u64_list(fields["data_offsets"])
    if not isinstance(dtype, str):
        raise HeaderError(f"tensor {shown(name)}: dtype must be a string")
    if shape is None:
        raise HeaderError(f"tensor {shown(name)}: shape must be a list of whole numbers >= 0")
    if offsets is None or len(offsets) != 2:
        raise HeaderError(f"tensor {shown(name)}: data_offsets must be two whole numbers >= 0")
    if dtype not in DTYPE_SIZES:
        raise HeaderError(
            f"tensor {shown(name)} has dtype {shown(dtype)}, which lrmerge does not read ({', '.join(DTYPE_SIZES)})"
        )
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= U64:
            raise HeaderError(f"tensor {shown(name)}: its shape overflows")
    if numel * DTYPE_SIZES[dtype] * 8 >= U64:
        raise HeaderError(f"tensor {shown(name)}: its size overflows")
    return TensorSpec(dtype, tuple(shape)), offsets[0], offsets[1]


def parse_header(raw: bytes, data_size: int) -> tuple[dict[str, tuple[TensorSpec, int, int]], dict[str, str]]:
    """Check a safetensors header (the JSON after the length) as the `safetensors` library
    does, for a file with `data_size` bytes after it: each tensor's byte range must match
    its dtype and shape, and the ranges must tile the data exactly, without gaps or
    overlaps. Returns {name: (spec, begin, end)} (offsets into the data) and the metadata.
    Raises HeaderError saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("not UTF-8") from None
    doc = _strict_json(text)
    if not isinstance(doc, _Object):
        raise HeaderError("not a JSON object")
    metadata: dict[str, str] | None = None
    entries: dict[str, tuple[TensorSpec, int, int]] = {}
    seen_metadata = False
    for key, value in doc:
        if key != "__metadata__":
            entries[key] = _tensor_entry(key, value)  # a repeated name: the last wins, as in safetensors
            continue
        if seen_metadata:
            raise HeaderError("__metadata__ appears twice")
        seen_metadata = True
        if value is not None:
            if not isinstance(value, _Object) or not all(isinstance(v, str) for _, v in value):
                raise HeaderError("__metadata__ must map strings to strings")
            metadata = dict(value)
    position = 0
    for name, (spec, begin, end) in sorted(entries.items(), key=lambda item: item[1][1:]):
        if begin != position or end < begin:
            raise HeaderError(f"tensor {shown(name)}: its data_offsets overlap another tensor or leave a gap")
        if end - begin != spec.nbytes:
            raise HeaderError(
                f"tensor {shown(name)}: data_offsets span {end - begin} bytes, its dtype and shape need {spec.nbytes}"
            )
        position = end
    if position != data_size:
        raise HeaderError(f"the tensors cover {position} bytes of data, the file holds {data_size} (truncated?)")
    return entries, metadata or {}
