"""Hostile protobuf messages, written byte by byte from the descriptors.

The strategies here do not build messages with the protobuf runtime (which
refuses invalid UTF-8, wrong wire types and truncated fields): they write the
wire format themselves, so a case can be anything a hostile client can send:
extreme varints, NaN and infinite floats, strings that are not UTF-8,
oversized repeated fields, unknown field numbers, a known field number with
the wrong wire type, and random bytes as the whole message.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

VARINT, I64, LEN, I32 = 0, 1, 2, 5
MASK64 = (1 << 64) - 1
# Integers at the edges of every protobuf integer type.
EXTREME_INTS = (
    0,
    1,
    -1,
    2**31 - 1,
    -(2**31),
    2**32 - 1,
    2**32,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
)
EXTREME_FLOATS = (0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324)
# Strings that test names, paths and parsers rather than lengths.
TRICKY_STRINGS = (
    "",
    " ",
    "..",
    "../../../../etc/passwd",
    "a/b",
    "%2F",
    "%00",
    "a\x00b",
    "\x00",
    "\r\nx-injected: 1",
    "${jndi:ldap://127.0.0.1/x}",
    "'; DROP TABLE keys; --",
    "*",
    "\u202e\ufeff",
    "\U0001f600" * 8,
)
# How large an "oversized" string or repeated field gets (the last ones pass
# gRPC's default 4 MiB receive limit).
HUGE_LENGTHS = (70_000, 1_100_000, 4_300_000)
REPEAT_COUNTS = (1_000, 20_000, 200_000)
REPEAT_BUDGET = 6_000_000  # bytes: an oversized repeated field stays below this
MAX_DEPTH = 3

_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_BOOL,
}
_ZIGZAG_TYPES = {FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_I32_TYPES = {
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_FLOAT,
}
_I64_TYPES = {
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_DOUBLE,
}


def varint(value: int) -> bytes:
    """Encodes an integer as a varint (negative numbers as 64-bit two's complement)."""
    value &= MASK64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def zigzag(value: int) -> int:
    """Maps a signed 64-bit integer to sint64's unsigned form."""
    value = max(-(2**63), min(2**63 - 1, value))
    return ((value << 1) ^ (value >> 63)) & MASK64


def key(number: int, wire_type: int) -> bytes:
    """Encodes a field key (tag)."""
    return varint((number << 3) | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Encodes a LEN field."""
    return key(number, LEN) + varint(len(payload)) + payload


def _ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EXTREME_INTS), st.integers(-(2**63), 2**64 - 1))


def pack_float(fmt: str, value: float) -> bytes:
    """Packs a float; values too large for a 32-bit float become infinities."""
    try:
        return struct.pack(fmt, value)
    except OverflowError:
        return struct.pack(fmt, float("inf") if value > 0 else float("-inf"))


def _float_bytes(fmt: str) -> st.SearchStrategy[bytes]:
    size = struct.calcsize(fmt)
    floats = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(allow_nan=True, width=64))
    return st.one_of(
        floats.map(lambda f: pack_float(fmt, f)), st.binary(min_size=size, max_size=size)
    )


def string_payloads(hints: Sequence[str] = ()) -> st.SearchStrategy[bytes]:
    """A string field's bytes: text, tricks, hints, invalid UTF-8, or huge."""
    options: list[st.SearchStrategy[bytes]] = [
        st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.sampled_from(TRICKY_STRINGS).map(str.encode),
        st.binary(max_size=40),  # mostly not UTF-8
        st.sampled_from((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf")),
        st.sampled_from(HUGE_LENGTHS).map(lambda n: b"A" * n),
    ]
    if hints:
        options.insert(0, st.sampled_from(tuple(hints)).map(str.encode))
    return st.one_of(options)


def _scalar(field: FieldDescriptor, hints: Sequence[str]) -> st.SearchStrategy[tuple[int, bytes]]:
    """(wire type, encoded value) of one scalar element."""
    kind = field.type
    if kind in _INT_TYPES:
        return _ints().map(lambda v: (VARINT, varint(v)))
    if kind in _ZIGZAG_TYPES:
        return _ints().map(lambda v: (VARINT, varint(zigzag(v))))
    if kind in _I32_TYPES:
        return _float_bytes("<f").map(lambda b: (I32, b))
    if kind in _I64_TYPES:
        return _float_bytes("<d").map(lambda b: (I64, b))
    if kind == FieldDescriptor.TYPE_STRING:
        return string_payloads(hints).map(lambda b: (LEN, varint(len(b)) + b))
    return st.binary(max_size=64).map(lambda b: (LEN, varint(len(b)) + b))  # bytes


def _element(
    field: FieldDescriptor, depth: int, hints: Mapping[str, Sequence[str]]
) -> st.SearchStrategy[bytes]:
    """One encoded occurrence of `field` (key included)."""
    if field.message_type is not None:
        inner = message_payloads(field.message_type, depth + 1, hints)
        return inner.map(lambda b: length_delimited(field.number, b))
    return _scalar(field, hints.get(field.name, ())).map(
        lambda wv: key(field.number, wv[0]) + wv[1]
    )


def _packed(field: FieldDescriptor, hints: Mapping[str, Sequence[str]]) -> st.SearchStrategy[bytes]:
    """A packed repeated scalar: values without keys inside one LEN field."""
    values = st.lists(_scalar(field, ()), max_size=8)
    return values.map(lambda vs: length_delimited(field.number, b"".join(v for _, v in vs)))


def _repeat(element: bytes, count: int) -> bytes:
    """`element` `count` times, at most REPEAT_BUDGET bytes (at least once)."""
    return element * max(1, min(count, REPEAT_BUDGET // max(1, len(element))))


def field_payloads(
    field: FieldDescriptor, depth: int, hints: Mapping[str, Sequence[str]]
) -> st.SearchStrategy[bytes]:
    """Every occurrence of one field, or nothing."""
    element = _element(field, depth, hints)
    if not field.is_repeated:
        # A non-repeated field may still arrive twice (the last one wins).
        return st.one_of(
            st.just(b""), element, st.lists(element, min_size=2, max_size=3).map(b"".join)
        )
    options = [
        st.lists(element, max_size=6).map(b"".join),
        st.tuples(element, st.sampled_from(REPEAT_COUNTS)).map(lambda t: _repeat(*t)),
    ]
    if field.type not in (
        FieldDescriptor.TYPE_MESSAGE,
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_BYTES,
    ):
        options.append(_packed(field, hints))
    return st.one_of(options)


def junk_fields(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Fields the schema does not expect: unknown numbers, or known ones with a wrong wire type."""
    numbers = [f.number for f in descriptor.fields] or [1]
    number = st.one_of(st.sampled_from(numbers), st.integers(1, 2**29 - 1))
    value = st.one_of(
        _ints().map(lambda v: (VARINT, varint(v))),
        st.binary(max_size=16).map(lambda b: (LEN, varint(len(b)) + b)),
        st.binary(min_size=8, max_size=8).map(lambda b: (I64, b)),
        st.binary(min_size=4, max_size=4).map(lambda b: (I32, b)),
        st.sampled_from((3, 4, 6, 7)).map(lambda w: (w, b"")),  # groups and invalid wire types
    )
    return st.tuples(number, value).map(lambda t: key(t[0], t[1][0]) + t[1][1])


def message_payloads(
    descriptor: Descriptor, depth: int = 0, hints: Mapping[str, Sequence[str]] | None = None
) -> st.SearchStrategy[bytes]:
    """A hostile encoding of `descriptor`'s message (hints: field name -> likely values).

    Mostly well-formed field by field (so that cases reach the service's own
    validation), sometimes with junk fields, truncated, or random bytes.
    """
    hints = hints or {}
    if depth >= MAX_DEPTH:
        return st.binary(max_size=16)
    fields = st.tuples(*(field_payloads(f, depth, hints) for f in descriptor.fields))
    structured = st.tuples(fields, st.lists(junk_fields(descriptor), max_size=2)).map(
        lambda t: b"".join(t[0]) + b"".join(t[1])
    )
    return st.one_of(
        structured,
        structured,
        structured,
        fields.map(b"".join).map(lambda b: b[: max(0, len(b) - 1)]),  # truncated
        st.binary(max_size=256),  # random bytes as the whole message
    )
