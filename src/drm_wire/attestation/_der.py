"""A minimal, tolerant DER reader: just enough to take an RA-TLS certificate apart.

Why not pyca/cryptography? Real Gramine certificates (mbedTLS before the RFC 5758 fix)
encode ``ecdsa-with-SHA256`` with an explicit NULL parameter, which cryptography refuses
with ``ParseError ExtraData``; OpenSSL and mbedTLS accept it. RA-TLS verification never
relies on the X.509 self-signature (possession of the key is proven by the TLS handshake
and the key is bound by the quote), so all we need from the certificate is the
SubjectPublicKeyInfo bytes and the extensions. Walking the DER for those is ~100 lines.

Safety: every length is checked against the end of its enclosing element before it is
used, only definite lengths of at most four bytes are accepted, and nesting is only as
deep as the fixed certificate structure (no recursion on input). Anything odd raises
:class:`DerError`, which callers translate into their own error class.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

__all__ = [
    "TAG_BOOLEAN",
    "TAG_CONTEXT_0",
    "TAG_CONTEXT_3",
    "TAG_INTEGER",
    "TAG_OCTET_STRING",
    "TAG_OID",
    "TAG_SEQUENCE",
    "DerError",
    "Tlv",
    "certificate_from_pem",
    "certificate_parts",
    "children",
    "read_tlv",
    "single",
]

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_SEQUENCE = 0x30
TAG_CONTEXT_0 = 0xA0
TAG_CONTEXT_3 = 0xA3

_PEM = re.compile(
    rb"-----BEGIN (TRUSTED CERTIFICATE|CERTIFICATE)-----([A-Za-z0-9+/=\s]*?)-----END \1-----"
)
#: Longest length field we accept (0x84 + 4 bytes): 4 GiB is far beyond any certificate.
_MAX_LENGTH_OCTETS = 4


class DerError(ValueError):
    """The bytes are not the DER we expected. Internal; callers translate it."""


@dataclass(frozen=True, slots=True)
class Tlv:
    """One DER element located inside a buffer.

    Attributes:
        tag: the identifier octet (single-byte tags only).
        start: offset of the identifier octet.
        value_start: offset of the first content octet.
        end: offset one past the last content octet.
    """

    tag: int
    start: int
    value_start: int
    end: int

    def value(self, data: bytes) -> bytes:
        """The content octets."""
        return data[self.value_start : self.end]

    def encoded(self, data: bytes) -> bytes:
        """The whole element: identifier, length and content."""
        return data[self.start : self.end]


def read_tlv(data: bytes, offset: int, end: int) -> Tlv:
    """Read the element at ``offset``, which must end at or before ``end``.

    Raises:
        DerError: truncated header, high-tag-number form, indefinite or non-minimal
            length, or a length running past ``end``.
    """
    if not 0 <= offset < end <= len(data):
        raise DerError(f"no element at offset {offset}")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte tag at offset {offset}")
    pos = offset + 1
    if pos >= end:
        raise DerError(f"truncated length at offset {pos}")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise DerError(f"indefinite length at offset {offset}")
        if count > _MAX_LENGTH_OCTETS:
            raise DerError(f"length field of {count} octets at offset {offset}")
        if pos + count > end:
            raise DerError(f"truncated length at offset {pos}")
        length = int.from_bytes(data[pos : pos + count], "big")
        if data[pos] == 0 or length < 0x80:
            raise DerError(f"non-minimal length at offset {offset}")
        pos += count
    if length > end - pos:
        raise DerError(f"element at offset {offset} claims {length} bytes, {end - pos} remain")
    return Tlv(tag=tag, start=offset, value_start=pos, end=pos + length)


def children(data: bytes, parent: Tlv) -> list[Tlv]:
    """The elements directly inside a constructed element, which must fill it exactly.

    Raises:
        DerError: ``parent`` is primitive, or a child is malformed.
    """
    if not parent.tag & 0x20:
        raise DerError(f"element at offset {parent.start} is not constructed")
    items: list[Tlv] = []
    pos = parent.value_start
    while pos < parent.end:
        item = read_tlv(data, pos, parent.end)
        items.append(item)
        pos = item.end
    return items


def single(data: bytes, expected_tag: int) -> Tlv:
    """Read ``data`` as exactly one element with ``expected_tag`` and nothing after it.

    Raises:
        DerError: wrong tag, malformed element, or trailing bytes.
    """
    item = read_tlv(data, 0, len(data))
    if item.tag != expected_tag:
        raise DerError(f"expected tag 0x{expected_tag:02x}, got 0x{item.tag:02x}")
    if item.end != len(data):
        raise DerError(f"{len(data) - item.end} trailing bytes")
    return item


def certificate_parts(der: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The SubjectPublicKeyInfo and the extensions of an X.509 v3 certificate.

    Only the structure is checked (Certificate = SEQUENCE { tbs, algorithm, BIT STRING });
    the AlgorithmIdentifiers, names and dates are skipped, not interpreted.

    Returns:
        ``(spki_der, extensions)`` where ``extensions`` maps the OID *content* bytes
        (without the ``06 LL`` header, so Gramine's quirky OID is just bytes) to the
        extension value (the content of the ``extnValue`` OCTET STRING).

    Raises:
        DerError: malformed structure, not version 3, or a duplicated extension.
    """
    certificate = single(der, TAG_SEQUENCE)
    parts = children(der, certificate)
    if [p.tag for p in parts] != [TAG_SEQUENCE, TAG_SEQUENCE, 0x03]:
        raise DerError("Certificate is not SEQUENCE { tbs, algorithm, signature }")
    fields = children(der, parts[0])
    if not fields or fields[0].tag != TAG_CONTEXT_0:
        raise DerError("not an X.509 v3 certificate (no version field)")
    if fields[0].value(der) != b"\x02\x01\x02":
        raise DerError("not an X.509 v3 certificate")
    # version, serial, signature, issuer, validity, subject, spki, [1], [2], [3]
    if len(fields) < 7 or [f.tag for f in fields[1:7]] != [TAG_INTEGER] + [TAG_SEQUENCE] * 5:
        raise DerError("TBSCertificate fields out of order")
    spki = fields[6].encoded(der)
    ext_fields = [f for f in fields[7:] if f.tag == TAG_CONTEXT_3]
    if len(ext_fields) != 1:
        raise DerError("no extensions")
    outer = children(der, ext_fields[0])
    if len(outer) != 1 or outer[0].tag != TAG_SEQUENCE:
        raise DerError("extensions are not one SEQUENCE")
    extensions: dict[bytes, bytes] = {}
    for ext in children(der, outer[0]):
        if ext.tag != TAG_SEQUENCE:
            raise DerError("extension is not a SEQUENCE")
        items = children(der, ext)
        tags = [i.tag for i in items]
        if tags not in ([TAG_OID, TAG_OCTET_STRING], [TAG_OID, TAG_BOOLEAN, TAG_OCTET_STRING]):
            raise DerError("extension is not { OID, [critical], OCTET STRING }")
        oid = items[0].value(der)
        if oid in extensions:
            raise DerError("duplicated extension")
        extensions[oid] = items[-1].value(der)
    return spki, extensions


def certificate_from_pem(text: bytes) -> bytes:
    """The DER of the first ``CERTIFICATE`` or ``TRUSTED CERTIFICATE`` PEM block.

    ``gramine-ratls`` writes its certificate as ``TRUSTED CERTIFICATE`` (plain DER inside,
    mbedTLS style); OpenSSL's form of that label appends an ``X509_CERT_AUX`` SEQUENCE,
    which is checked for shape and dropped.

    Raises:
        DerError: no such block, bad base64, or a malformed trailer.
    """
    match = _PEM.search(text)
    if match is None:
        raise DerError("no CERTIFICATE or TRUSTED CERTIFICATE PEM block")
    try:
        der = binascii.a2b_base64(b"".join(match.group(2).split()), strict_mode=True)
    except binascii.Error as exc:
        raise DerError("PEM body is not valid base64") from exc
    if match.group(1) == b"TRUSTED CERTIFICATE" and der:
        first = read_tlv(der, 0, len(der))
        if first.end != len(der):
            single(der[first.end :], TAG_SEQUENCE)
        return der[: first.end]
    return der
