"""The wire format: packets round-trip every value exactly, and malformed or oversized ones are refused."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from AttentionSegLib.server.codec import MAGIC, Limits, PacketError, decode, encode
from AttentionSegLib.server.patches import Mirror, StalePatch, changed_box


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64",
                                   "float32", "float64"])
def test_arrays_round_trip_exactly(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 5, 7)) * 1000).astype(dtype)

    back = decode(encode({"a": array}))["a"]

    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_nested_values_bytes_and_numpy_scalars_round_trip() -> None:
    payload = {"n": np.int64(3), "x": np.float32(0.5), "t": (1, 2), "s": "é", "none": None, "ok": True,
               "blob": b"\x00checkpoint", "maps": {"gate1": np.zeros((2, 3), np.float32)},
               "empty": np.zeros((0, 4))}

    back = decode(encode(payload))

    assert back["n"] == 3 and back["x"] == 0.5 and back["t"] == [1, 2] and back["s"] == "é"
    assert back["none"] is None and back["ok"] is True and back["blob"] == b"\x00checkpoint"
    np.testing.assert_array_equal(back["maps"]["gate1"], np.zeros((2, 3), np.float32))
    assert back["empty"].shape == (0, 4)


def test_byte_shuffling_makes_a_ct_smaller_than_plain_zlib() -> None:
    k, j, i = np.mgrid[0:32, 0:64, 0:64]
    ct = (40 * np.sin(i / 7.0) + 30 * np.cos(j / 5.0) + k - 1000).astype(np.int16)

    assert len(encode(ct)) < len(zlib.compress(ct.tobytes(), 1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), {"$array": 0}, {1.5: "x"}])
def test_what_cannot_travel_is_refused_when_encoding(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode({"v": value})


def packet(header: object, blobs: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + blobs


def array_header(length: int, shape: list[int], dtype: str = "uint8", offset: int = 0) -> dict:
    return {"payload": {"a": {"$array": 0}},
            "blobs": [{"kind": "array", "dtype": dtype, "shape": shape, "codec": "zlib", "offset": offset,
                       "length": length}]}


BLOB = zlib.compress(bytes(24))


@pytest.mark.parametrize(("body", "message"), [
    (b"", "not an AttentionSeg packet"),
    (b'{"json": "instead"}', "not an AttentionSeg packet"),
    (MAGIC + struct.pack("<I", 100) + b"{}", "truncated packet"),
    (MAGIC + struct.pack("<I", 3) + b"{{{", "not valid JSON"),
    (packet({"payload": 1}), "exactly 'payload' and 'blobs'"),
    (MAGIC + struct.pack("<I", 33) + b'{"payload": NaN, "blobs": [    ]}', "not valid JSON"),
    (packet(array_header(len(BLOB), [2, 3, 4], offset=5), BLOB), "do not lie within"),
    (packet(array_header(len(BLOB), [2, 3, 5]), BLOB), "does not decompress to its declared 30 bytes"),
    (packet(array_header(len(BLOB), [2, 3, 4], dtype="object"), BLOB), "dtype 'object'"),
    (packet(array_header(len(BLOB), [2, -3, 4]), BLOB), "non-negative integers"),
    (packet(array_header(4, [2, 3, 4]), b"junk"), "not zlib data"),
    (packet({"payload": {"$array": 3}, "blobs": []}), "bad reference"),
    (packet({"payload": {"$bytes": 0, "x": 1}, "blobs": []}), "bad reference"),
])
def test_malformed_packets_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(PacketError, match=message):
        decode(body)


def test_a_zlib_bomb_stops_at_the_declared_size_and_at_the_limit() -> None:
    bomb = zlib.compress(bytes(50 << 20), 9)  # 50 MiB of zeros in about 50 KiB
    with pytest.raises(PacketError, match="does not decompress to its declared 8 bytes"):
        decode(packet(array_header(len(bomb), [8]), bomb))
    with pytest.raises(PacketError, match="exceed what this packet may hold"):
        decode(packet(array_header(len(bomb), [50 << 20]), bomb), Limits(max_decoded_bytes=1 << 20))


def test_limits_on_the_header_and_the_number_of_blobs() -> None:
    many = encode([np.zeros(1, np.uint8)] * 5)
    with pytest.raises(PacketError, match="at most 4 are allowed"):
        decode(many, Limits(max_blobs=4))
    with pytest.raises(PacketError, match="exceeds the limit"):
        decode(encode({"x": "y" * 2000}), Limits(max_header_bytes=1000))


# -- changed-region patches ----------------------------------------------------------------------------------


def test_a_patch_carries_only_the_changed_box_and_rebuilds_the_map() -> None:
    sender, receiver = Mirror((20, 30, 40), 255), Mirror((20, 30, 40), 255)
    new = sender.array.copy()
    new[5, 10:12, 3] = 1
    new[7, 11, 8] = 0

    patch = decode(encode(sender.diff(new)))

    assert patch["kind"] == "patch" and patch["start"] == [5, 10, 3] and patch["data"].shape == (3, 2, 6)
    np.testing.assert_array_equal(receiver.apply(patch), new)
    assert receiver.version == sender.version == 1


def test_an_unchanged_map_sends_an_empty_patch() -> None:
    sender, receiver = Mirror((4, 5, 6), 0), Mirror((4, 5, 6), 0)
    patch = sender.diff(np.zeros((4, 5, 6), np.uint8))
    assert patch["data"].size == 0
    np.testing.assert_array_equal(receiver.apply(patch), np.zeros((4, 5, 6)))


def test_a_lost_patch_is_detected_and_a_full_map_recovers() -> None:
    sender, receiver = Mirror((4, 5, 6), 255), Mirror((4, 5, 6), 255)
    first = sender.array.copy()
    first[0, 0, 0] = 1
    sender.diff(first)  # lost on the way
    second = first.copy()
    second[3, 4, 5] = 0

    with pytest.raises(StalePatch, match="based on version 1 but version 0"):
        receiver.apply(sender.diff(second))
    np.testing.assert_array_equal(receiver.apply(sender.diff(second, full=True)), second)
    assert receiver.version == sender.version


@pytest.mark.parametrize("patch", [
    {"kind": "patch", "base": 0, "version": 1, "start": [3, 0, 0], "data": np.zeros((2, 1, 1), np.uint8)},
    {"kind": "patch", "base": 0, "version": 1, "start": [0, 0], "data": np.zeros((1, 1), np.uint8)},
    {"kind": "patch", "base": 0, "version": 1, "start": [0, 0, 0], "data": np.zeros((1, 1, 1), np.float32)},
    {"kind": "full", "version": 1, "data": np.zeros((4, 4, 4), np.uint8)},
    {"kind": "diff", "version": 1, "data": np.zeros((1, 1, 1), np.uint8)},
])
def test_patches_outside_the_grid_or_of_another_kind_are_refused(patch: dict) -> None:
    mirror = Mirror((4, 5, 6), 255)
    with pytest.raises(ValueError):
        mirror.apply(patch)
    assert mirror.version == 0 and (mirror.array == 255).all()


def test_changed_box_of_identical_maps_is_empty() -> None:
    a = np.zeros((3, 3), np.uint8)
    assert changed_box(a, a) == ((0, 0), (0, 0))
    b = a.copy()
    b[1, 2] = 1
    assert changed_box(a, b) == ((1, 2), (2, 3))
