"""The wire format of ``attentionseg serve``: one binary packet per request or response body.

A packet is ``MAGIC`` + the header's length (uint32, little-endian) + a JSON header + the compressed blobs::

    b"ASEG\\x01" | n | {"payload": ..., "blobs": [{"kind": "array", "dtype": "uint8", "shape": [..],
                         "codec": "zlib", "offset": 0, "length": 812}, ...]} | blobs

In the payload, every numpy array is ``{"$array": index}`` and every ``bytes`` value ``{"$bytes": index}``
into ``blobs``. Arrays travel little-endian and zlib-compressed; arrays of more than one byte per element are
byte-shuffled first (all first bytes, then all second bytes ...), which compresses images and float maps
much better. Decoding trusts nothing: every size, offset, dtype and shape is checked, and no blob may
decompress to more than its declared size (a zlib bomb stops at the limit).

numpy and the standard library only: the client side (Slicer) imports this without torch.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"ASEG\x01"
_LENGTH = struct.Struct("<I")
DTYPES = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                    "float32", "float64"})
ARRAY_KEY, BYTES_KEY = "$array", "$bytes"


class PacketError(ValueError):
    """A body that is not a well-formed packet, or one beyond the limits; the message says what is wrong."""


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts.

    Attributes:
        max_header_bytes: the JSON header's size.
        max_blobs: arrays and byte strings in one packet.
        max_decoded_bytes: all blobs together once decompressed.
        max_dims: dimensions of one array.
    """

    max_header_bytes: int = 1 << 20
    max_blobs: int = 64
    max_decoded_bytes: int = 4 << 30
    max_dims: int = 4


# ---------------------------------------------------------------------------------------------------- encode


def encode(payload: Any, *, level: int = 1) -> bytes:
    """``payload`` (JSON-able values, numpy arrays and scalars, ``bytes``) as a packet."""
    blobs: list[bytes] = []
    descriptors: list[dict[str, Any]] = []

    def add(blob: bytes, descriptor: dict[str, Any]) -> int:
        offset = sum(len(b) for b in blobs)
        blobs.append(blob)
        descriptors.append({**descriptor, "offset": offset, "length": len(blob)})
        return len(descriptors) - 1

    def walk(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            if array.dtype.name not in DTYPES:
                raise TypeError(f"arrays of dtype {array.dtype} cannot be sent (use one of {sorted(DTYPES)})")
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            raw, codec = _shuffle(array)
            index = add(zlib.compress(raw, level), {"kind": "array", "dtype": array.dtype.name,
                                                   "shape": list(array.shape), "codec": codec})
            return {ARRAY_KEY: index}
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            return {BYTES_KEY: add(zlib.compress(raw, level), {"kind": "bytes", "size": len(raw),
                                                              "codec": "zlib"})}
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                key = str(key) if isinstance(key, (int, np.integer)) else key
                if not isinstance(key, str) or key.startswith("$"):
                    raise TypeError(f"packet keys must be strings not starting with '$', got {key!r}")
                out[key] = walk(item)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(item) for item in value]
        if isinstance(value, np.generic):
            return walk(value.item())
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"packets carry finite numbers only, got {value}")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"a {type(value).__name__} cannot be sent in a packet")

    header = json.dumps({"payload": walk(payload), "blobs": descriptors}, separators=(",", ":"),
                        allow_nan=False).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *blobs])


def _shuffle(array: np.ndarray) -> tuple[bytes, str]:
    if array.dtype.itemsize == 1 or array.size == 0:
        return array.tobytes(), "zlib"
    return array.view(np.uint8).reshape(-1, array.dtype.itemsize).T.tobytes(), "zlib-shuffle"


# ---------------------------------------------------------------------------------------------------- decode


def decode(data: bytes, limits: Limits = Limits()) -> Any:
    """The payload of a packet, arrays and byte strings restored.

    Raises:
        PacketError: not a packet, a malformed header, a blob that does not decompress to its declared size,
            or anything beyond ``limits``.
    """
    data = memoryview(data)
    if len(data) < len(MAGIC) + _LENGTH.size or bytes(data[: len(MAGIC)]) != MAGIC:
        raise PacketError("the body is not an AttentionSeg packet (it must start with b'ASEG\\x01'; send it "
                          "with the content type of AttentionSegLib.server.PACKET_TYPE)")
    (header_length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if header_length > limits.max_header_bytes:
        raise PacketError(f"packet header of {header_length} bytes exceeds the limit of "
                          f"{limits.max_header_bytes}")
    if start + header_length > len(data):
        raise PacketError(f"truncated packet: the header needs {header_length} bytes, "
                          f"{len(data) - start} arrived")
    try:
        header = json.loads(bytes(data[start:start + header_length]), parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise PacketError(f"the packet header is not valid JSON: {error}") from None
    if not isinstance(header, dict) or set(header) != {"payload", "blobs"} or \
            not isinstance(header["blobs"], list):
        raise PacketError("the packet header must be an object with exactly 'payload' and 'blobs' (a list)")
    descriptors = header["blobs"]
    if len(descriptors) > limits.max_blobs:
        raise PacketError(f"the packet holds {len(descriptors)} blobs; at most {limits.max_blobs} are "
                          "allowed")
    body = data[start + header_length:]
    budget = [limits.max_decoded_bytes]
    values = [_blob(n, d, body, limits, budget) for n, d in enumerate(descriptors)]
    return _restore(header["payload"], values)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a packet may carry")


def _blob(index: int, descriptor: Any, body: memoryview, limits: Limits, budget: list[int]) -> Any:
    where = f"blob {index}"
    if not isinstance(descriptor, dict):
        raise PacketError(f"{where}: its descriptor must be an object")
    offset, length = descriptor.get("offset"), descriptor.get("length")
    if not (_is_count(offset) and _is_count(length)) or offset + length > len(body):
        raise PacketError(f"{where}: offset {offset!r} and length {length!r} do not lie within the "
                          f"{len(body)} bytes after the header")
    kind, codec = descriptor.get("kind"), descriptor.get("codec")
    if kind == "array":
        dtype_name, shape = descriptor.get("dtype"), descriptor.get("shape")
        if dtype_name not in DTYPES:
            raise PacketError(f"{where}: dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > limits.max_dims or not all(map(_is_count, shape)):
            raise PacketError(f"{where}: shape {shape!r} must be a list of at most {limits.max_dims} "
                              "non-negative integers")
        if codec not in ("zlib", "zlib-shuffle"):
            raise PacketError(f"{where}: unknown codec {codec!r}")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        size = math.prod(shape) * dtype.itemsize
        raw = _inflate(body[offset:offset + length], size, where, budget)
        if codec == "zlib-shuffle" and dtype.itemsize > 1:
            raw = np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, -1).T.tobytes()
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if kind == "bytes":
        size = descriptor.get("size")
        if not _is_count(size) or codec != "zlib":
            raise PacketError(f"{where}: a bytes blob needs a size and the zlib codec")
        return _inflate(body[offset:offset + length], size, where, budget)
    raise PacketError(f"{where}: unknown kind {kind!r} (array or bytes)")


def _inflate(blob: memoryview, size: int, where: str, budget: list[int]) -> bytes:
    if size > budget[0]:
        raise PacketError(f"{where}: {size} bytes once decompressed exceed what this packet may hold")
    budget[0] -= size
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(bytes(blob), size)
    except zlib.error as error:
        raise PacketError(f"{where}: not zlib data ({error})") from None
    if len(raw) != size or inflater.unconsumed_tail or inflater.unused_data or not inflater.eof:
        raise PacketError(f"{where}: does not decompress to its declared {size} bytes")
    return raw


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _restore(value: Any, blobs: list[Any]) -> Any:
    if isinstance(value, dict):
        for key in (ARRAY_KEY, BYTES_KEY):
            if key in value:
                index = value[key]
                if set(value) != {key} or not _is_count(index) or index >= len(blobs):
                    raise PacketError(f"bad reference {value!r}: it must be the only key and name one of the "
                                      f"{len(blobs)} blobs")
                expected = np.ndarray if key == ARRAY_KEY else bytes
                if not isinstance(blobs[index], expected):
                    raise PacketError(f"{value!r} refers to a blob of another kind")
                return blobs[index]
        return {k: _restore(v, blobs) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, blobs) for v in value]
    return value
