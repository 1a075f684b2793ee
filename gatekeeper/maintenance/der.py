"""Just enough DER (ITU-T X.690) to write the maintenance API's certificate and to find the
public key in any certificate: definite lengths, the universal types X.509 uses, and a reader
that splits a constructed value into its elements. Nothing here is a general ASN.1 codec."""

from __future__ import annotations

import datetime

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OID = 0x06
UTF8_STRING = 0x0C
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
BOOLEAN = 0x01


class DerError(ValueError):
    """Bytes that are not the DER expected (truncated, or a wrong length)."""


def tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def sequence(*items: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(items))


def integer(value: int) -> bytes:
    # Two's complement, shortest form: a leading zero byte keeps a positive value positive.
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body.extend(reversed(chunk))
    return tlv(OID, bytes(body))


def boolean(value: bool) -> bytes:
    return tlv(BOOLEAN, b"\xff" if value else b"\x00")


def bit_string(data: bytes) -> bytes:
    return tlv(BIT_STRING, b"\x00" + data)  # no unused bits


def time(moment: datetime.datetime) -> bytes:
    """X.509 Time: UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5)."""
    moment = moment.astimezone(datetime.UTC)
    if moment.year < 2050:
        return tlv(UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode())


def explicit(number: int, content: bytes) -> bytes:
    """A context-specific constructed tag [number] around content."""
    return tlv(0xA0 | number, content)


def implicit(number: int, content: bytes) -> bytes:
    """A context-specific primitive tag [number] replacing a primitive type's own tag."""
    return tlv(0x80 | number, content)


def read(data: bytes, offset: int = 0) -> tuple[int, bytes, int]:
    """The element at offset: (tag, its content, the offset after it)."""
    try:
        tag, first = data[offset], data[offset + 1]
    except IndexError:
        raise DerError("DER value truncated") from None
    if tag & 0x1F == 0x1F:
        raise DerError("DER multi-byte tags are not used in certificates")
    start = offset + 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise DerError("DER length is indefinite or out of range")
        size = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + size
    if end > len(data):
        raise DerError("DER value truncated")
    return tag, data[start:end], end


def elements(content: bytes) -> list[tuple[int, bytes, bytes]]:
    """The elements of a constructed value's content: (tag, content, whole encoding)."""
    found = []
    offset = 0
    while offset < len(content):
        tag, inner, end = read(content, offset)
        found.append((tag, inner, content[offset:end]))
        offset = end
    return found
