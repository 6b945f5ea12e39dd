"""The one place msgpack is called, with every safety option spelled out.

A header is one msgpack map with string keys, whose values are ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes``, lists and maps of those, nested at most
:data:`~drm_wire.limits.MAX_NESTING` deep. Everything else is refused: extension types
(timestamps included: we define none), duplicate keys, non-string keys, oversized strings,
binaries and containers, trailing bytes. Every failure of the unpacker, whatever its type,
becomes a :class:`~drm_wire.errors.RemoteProtocolError` raised ``from`` the original.
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgpack

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import MAX_BIN_LEN, MAX_CONTAINER_LEN, MAX_HEADER_BYTES, MAX_NESTING, MAX_STR_LEN

__all__ = ["Header", "HeaderDecoder", "pack_header", "unpack_header"]

#: A decoded header: a map from field name to a plain msgpack value.
Header = dict[str, Any]

_SCALARS = (str, int, float, bytes, bool, type(None))


class _DuplicateKeyError(ValueError):
    pass


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    # No extension types are defined by this protocol, so any is hostile or a bug.
    raise ValueError(f"extension type {code} is not allowed")


def _map_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKeyError("duplicate key in map")
    return result


# Built once: msgpack.Packer is reusable and much faster than packb for small objects.
_PACKER = msgpack.Packer(
    use_bin_type=True,  # bytes stay bytes on the other side, never become str
    strict_types=True,  # no subclasses (enums, bool-as-int tricks) and no tuples sneak through
    datetime=False,  # no timestamps on the wire
    autoreset=True,
)

_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,  # str is UTF-8 text, invalid UTF-8 is an error
    "use_list": True,
    "strict_map_key": True,  # only str/bytes keys (we then require str)
    "max_str_len": MAX_STR_LEN,
    "max_bin_len": MAX_BIN_LEN,
    "max_array_len": MAX_CONTAINER_LEN,
    "max_map_len": MAX_CONTAINER_LEN,
    "max_ext_len": 0,
    "ext_hook": _refuse_ext,
    "timestamp": 0,
    "object_pairs_hook": _map_without_duplicates,
}


def pack_header(header: Header) -> bytes:
    """Encode one header map.

    Raises:
        LocalProtocolError: the header holds a value msgpack (in strict mode) cannot encode.
    """
    try:
        data: bytes = _PACKER.pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        _PACKER.reset()
        raise LocalProtocolError(f"cannot encode header: {exc}") from exc
    return data


class HeaderDecoder:
    """Decodes header maps one at a time, reusing one ``msgpack.Unpacker``.

    Reusing the unpacker saves building one per frame, a large part of a small frame's
    cost. After any error the decoder must be dropped: the connection closes.
    """

    __slots__ = ("_fed", "_unpacker")

    def __init__(self) -> None:
        # The framing layer hands over at most MAX_HEADER_BYTES at a time; the unpacker
        # may still hold the consumed bytes of the previous header until it compacts, so
        # its buffer is allowed twice that.
        self._unpacker = msgpack.Unpacker(max_buffer_size=2 * MAX_HEADER_BYTES, **_UNPACK_OPTIONS)
        self._fed = 0

    def decode(self, data: bytes | bytearray | memoryview) -> Header:
        """Decode exactly one header map from ``data`` and check its shape.

        Raises:
            RemoteProtocolError: for anything that is not exactly one well-formed map within
                the limits; ``code`` is ``limit_exceeded`` for size and nesting violations.
        """
        unpacker = self._unpacker
        try:
            unpacker.feed(data)
            self._fed += len(data)
            obj = unpacker.unpack()
        except msgpack.OutOfData as exc:
            raise RemoteProtocolError("truncated header") from exc
        except _DuplicateKeyError as exc:
            raise RemoteProtocolError("duplicate key in header") from exc
        except (msgpack.StackError, RecursionError) as exc:
            raise RemoteProtocolError(
                "header nested too deeply", code=ErrorCode.LIMIT_EXCEEDED, limit=MAX_NESTING
            ) from exc
        except ValueError as exc:
            # msgpack reports both size limits and malformed input as ValueError subclasses.
            limit = "exceeds max" in str(exc)
            code = ErrorCode.LIMIT_EXCEEDED if limit else ErrorCode.PROTOCOL_ERROR
            detail = str(exc) or type(exc).__name__
            raise RemoteProtocolError(f"malformed header: {detail}", code=code) from exc
        except Exception as exc:
            # msgpack documents that "other exceptions can be raised" on hostile input;
            # every one of them is the peer's fault, so all become the one error type.
            raise RemoteProtocolError(f"malformed header: {type(exc).__name__}") from exc
        if unpacker.tell() != self._fed:
            raise RemoteProtocolError("trailing bytes after the header")
        if type(obj) is not dict:
            raise RemoteProtocolError("a header must be a map", got=type(obj).__name__)
        _check_tree(obj)
        return obj


def unpack_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode one header map (see :meth:`HeaderDecoder.decode`), for one-off use."""
    return HeaderDecoder().decode(data)


_SCALAR_TYPES: frozenset[type] = frozenset(_SCALARS)


def _check_tree(root: dict[Any, Any]) -> None:
    """Require str keys, allowed value types, and nesting within MAX_NESTING.

    Recursive, but never deeper than MAX_NESTING calls: the depth is checked before each
    descent, so hostile depth cannot reach Python's recursion limit.
    """
    _check_map(root, 1)


def _check_map(node: dict[Any, Any], depth: int) -> None:
    for key, value in node.items():
        if type(key) is not str:
            raise RemoteProtocolError("header keys must be strings")
        if type(value) not in _SCALAR_TYPES:
            _check_container(value, depth + 1)


def _check_container(value: object, depth: int) -> None:
    if type(value) is not dict and type(value) is not list:
        raise RemoteProtocolError(f"value of type {type(value).__name__} refused")
    if depth > MAX_NESTING:
        raise RemoteProtocolError(
            "header nested too deeply", code=ErrorCode.LIMIT_EXCEEDED, limit=MAX_NESTING, got=depth
        )
    if type(value) is dict:
        _check_map(value, depth)
        return
    for item in value:
        if type(item) not in _SCALAR_TYPES:
            _check_container(item, depth + 1)
