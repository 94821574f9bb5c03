"""The P→D frame header (proto/transfer.py): exact round trips, and every malformed or out-of-limit field
rejected by `decode` with a reason naming it (never another exception type); the checksums equal their
published definitions (CRC32C: RFC 3720's check value, and the numpy fallback equals the hardware package)."""

from __future__ import annotations

import random
import zlib

import msgpack
import numpy as np
import pytest

from sparsepd.engine.state_io import StateDescriptor, TensorSpec
from sparsepd.model_config import get_preset
from sparsepd.proto import transfer as tp
from sparsepd.proto.transfer import Ack, FaultPlan, TransferError, TransferHeader, model_fingerprint

FP = "0123456789abcdef"


def _descriptor(num_pages: int = 3) -> StateDescriptor:
    specs = (TensorSpec(name="layers.0.swa", dtype="bfloat16", shape=(16, 64)),
             TensorSpec(name="layers.1.kv_compressed", dtype="bfloat16", shape=(num_pages, 32, 64)),
             TensorSpec(name="layers.1.index_cache", dtype="uint8", shape=(num_pages, 32, 144)),
             TensorSpec(name="layers.1.compressor.kv", dtype="float32", shape=(8, 128)),
             TensorSpec(name="layers.2.empty", dtype="int64", shape=(0, 5)))
    return StateDescriptor(position=300, num_pages=num_pages, output_ids=(17, 4), sampler_state=bytes(range(200)),
                           tensors=specs)


def _header(**kw) -> TransferHeader:
    return TransferHeader.from_descriptor(_descriptor(), transfer_id="tid-1", request_id="req 1", fingerprint=FP,
                                          **kw)


def _raw(**changes) -> dict:
    raw = msgpack.unpackb(_header(frame_bytes=4096).encode(), raw=False)
    raw.update(changes)
    return raw


def test_round_trip_is_exact_and_gives_back_the_descriptor():
    descriptor = _descriptor()
    header = _header(frame_bytes=4096)
    back = TransferHeader.decode(header.encode())
    assert back == header
    assert back.to_descriptor(StateDescriptor) == descriptor
    assert [t.nbytes for t in back.tensors] == [16 * 64 * 2, 3 * 32 * 64 * 2, 3 * 32 * 144, 8 * 128 * 4, 0]
    assert [t.num_frames for t in back.tensors] == [1, 3, 4, 1, 1]  # ⌈nbytes / 4096⌉, at least one
    assert back.num_bytes == descriptor.num_bytes
    assert back.num_frames == 10


def test_reframed_and_checksums_keep_everything_else():
    header = _header()
    assert [t.num_frames for t in header.tensors] == [1, 1, 1, 1, 1]  # 8 MiB default frames
    small = header.reframed(256).with_checksums("crc32c", [1, 2, 3, 0, 2**32 - 1])
    assert small.frame_bytes == 256 and [t.num_frames for t in small.tensors] == [8, 48, 54, 16, 1]
    assert small.checksum_algorithm == "crc32c" and [t.checksum for t in small.tensors] == [1, 2, 3, 0, 2**32 - 1]
    assert TransferHeader.decode(small.encode()) == small
    assert small.specs() == header.specs()
    assert small.reframed(4096).with_checksums(None, [None] * 5) == header.reframed(4096)


@pytest.mark.parametrize("algorithm, values, reason", [
    ("crc32c", [1, 2, None, 4, 5], r"checksum_algorithm is crc32c, but tensors \['layers.1.index_cache'\] carry no"),
    (None, [None, 7, None, None, None], r"tensors \['layers.1.kv_compressed'\] carry a checksum but .* is nil"),
    ("crc32c", [1, 2, 3], "3 checksums for 5 tensors"),
    ("crc32c", [1, 2, 3, 4, 2**32], "32-bit unsigned ints"),
])
def test_with_checksums_refuses_an_inconsistent_set(algorithm, values, reason):
    with pytest.raises(ValueError, match=reason):
        _header().with_checksums(algorithm, values)


def test_ack_round_trip_and_rejections():
    for ack in (Ack(transfer_id="t", ok=True), Ack.reject("", "x" * 5000)):
        assert Ack.decode(ack.encode()) == ack
    assert len(Ack.reject("t", "x" * 5000).reason) == tp.MAX_REASON_CHARS
    with pytest.raises(TransferError, match="ack ok: expected a bool"):
        Ack.decode(msgpack.packb({"transfer_id": "t", "ok": 1, "reason": ""}))
    with pytest.raises(TransferError, match="unexpected fields"):
        Ack.decode(msgpack.packb({"transfer_id": "t", "ok": True, "reason": "", "x": 1}))


BAD_HEADERS = [
    (lambda: b"\xc1\x00garbage", "malformed msgpack"),
    (lambda: _header().encode()[:-7], "malformed msgpack"),
    (lambda: _header().encode() + b"\x00", "malformed msgpack"),
    (lambda: msgpack.packb([1, 2, 3]), "expected a msgpack map"),
    (lambda: b"\x00" * (tp.MAX_HEADER_BYTES + 1), "more than the limit"),
    (lambda: msgpack.packb({k: v for k, v in _raw().items() if k != "position"}), r"missing fields \['position'\]"),
    (lambda: msgpack.packb(_raw(extra=1)), r"unexpected fields \['extra'\]"),
    (lambda: msgpack.packb(_raw(version=1)), "protocol version 1 is not supported; this side speaks 3"),
    (lambda: msgpack.packb({**{k: v for k, v in _raw().items() if k != "checksum_algorithm"}, "version": 1}),
     "protocol version 1 is not supported; this side speaks 3"),  # a version-1 header: the version is the reason
    (lambda: msgpack.packb({k: v for k, v in _raw().items() if k != "version"}), "version: expected an int"),
    (lambda: msgpack.packb(_raw(version="1")), "version: expected an int"),
    (lambda: msgpack.packb(_raw(position=True)), "position: expected an int"),
    (lambda: msgpack.packb(_raw(position=-1)), "position: expected an int in"),
    (lambda: msgpack.packb(_raw(num_pages=2**40)), "num_pages: expected an int in"),
    (lambda: msgpack.packb(_raw(transfer_id="a/b")), "transfer_id: expected a string matching"),
    (lambda: msgpack.packb(_raw(transfer_id="")), "transfer_id: expected a string matching"),
    (lambda: msgpack.packb(_raw(request_id="a\nb")), "request_id: expected a string of 1 to 256 printable"),
    (lambda: msgpack.packb(_raw(fingerprint="XYZ")), "fingerprint: expected a string matching"),
    (lambda: msgpack.packb(_raw(output_ids=[1, -2])), r"output_ids\[1\]: expected an int"),
    (lambda: msgpack.packb(_raw(output_ids=list(range(5000)))), "output_ids: expected a list of at most 4096"),
    (lambda: msgpack.packb(_raw(sampler_state="text")), "sampler_state: expected at most"),
    (lambda: msgpack.packb(_raw(sampler_state=b"x" * (tp.MAX_SAMPLER_STATE_BYTES + 1))), "sampler_state"),
    (lambda: msgpack.packb(_raw(frame_bytes=16)), "frame_bytes: expected an int in"),
    (lambda: msgpack.packb(_raw(tensors={"a": 1})), "tensors: expected a list"),
    (lambda: msgpack.packb(_raw(tensors=[{}] * (tp.MAX_TENSORS + 1))), "tensors: expected a list of at most 4096"),
    (lambda: msgpack.packb(_raw(tensors=[[1, 2]])), r"tensors\[0\]: expected a map"),
    (lambda: msgpack.packb(_raw(checksum_algorithm="md5")),
     r"checksum_algorithm: expected one of \['crc32c', 'crc32'\] or nil, got str 'md5'"),
    (lambda: msgpack.packb(_raw(checksum_algorithm=1)), "checksum_algorithm: expected one of"),
    (lambda: msgpack.packb(_raw(checksum_algorithm="crc32c")), "checksum_algorithm is crc32c, but tensors"),
]


def _bad_tensor(**changes) -> bytes:
    raw = _raw()
    raw["tensors"][1].update(changes)
    return msgpack.packb(raw)


BAD_HEADERS += [
    (lambda: _bad_tensor(dtype="complex128"), "tensor layers.1.kv_compressed dtype: expected one of"),
    (lambda: _bad_tensor(dtype="__class__"), "dtype: expected one of"),
    (lambda: _bad_tensor(name="../etc/passwd"), r"tensors\[1\] name: expected a string matching"),
    (lambda: _bad_tensor(shape=[1] * 9), "shape: expected at most 8 ints"),
    (lambda: _bad_tensor(shape=[3, -32, 64]), "shape: expected at most 8 ints"),
    (lambda: _bad_tensor(shape=[3, 32, 64.0]), "shape: expected at most 8 ints"),
    (lambda: _bad_tensor(nbytes=12), "nbytes: bfloat16 \\(3, 32, 64\\) holds 12288 bytes, the header says 12"),
    (lambda: _bad_tensor(shape=[2**20, 2**20, 64], nbytes=2**47), "nbytes: expected an int in"),
    (lambda: _bad_tensor(num_frames=1), "num_frames: 12288 bytes in frames of 4096 make 3, the header says 1"),
    (lambda: _bad_tensor(checksum=-1), "checksum: expected an int"),
    (lambda: _bad_tensor(checksum=2**32), "checksum: expected an int"),
    (lambda: _bad_tensor(checksum=5), r"tensors \['layers.1.kv_compressed'\] carry a checksum but"),
    (lambda: _bad_tensor(checksum=None, extra=0), "unexpected fields"),
    (lambda: _bad_tensor(crc32=None), r"unexpected fields \['crc32'\]"),
    (lambda: _bad_tensor(name="layers.0.swa"), "tensor names repeat: \\['layers.0.swa'\\]"),
]


@pytest.mark.parametrize("make, reason", BAD_HEADERS, ids=[r for _, r in BAD_HEADERS])
def test_decode_rejects_with_a_precise_reason(make, reason):
    with pytest.raises(TransferError, match=reason):
        TransferHeader.decode(make())


def test_total_size_is_capped():
    raw = _raw(frame_bytes=tp.MAX_FRAME_BYTES)
    big = {"name": "big", "dtype": "uint8", "shape": [2**35], "nbytes": 2**35, "num_frames": 32, "checksum": None}
    raw["tensors"] = [big, {**big, "name": "big2"}, {**big, "name": "big3"}]
    with pytest.raises(TransferError, match="more than the limit"):
        TransferHeader.decode(msgpack.packb(raw))


def test_random_corruption_never_escapes_as_another_exception():
    rng = random.Random(0)
    good = _header(frame_bytes=4096).with_checksums("crc32c", [11, 22, 33, 44, 55]).encode()
    outcomes = {"rejected": 0, "valid": 0}
    for _ in range(1500):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(data))
            if op < 0.6:
                data[i] = rng.randrange(256)
            elif op < 0.8:
                del data[i:i + rng.randint(1, 8)]
            else:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            header = TransferHeader.decode(bytes(data))
        except TransferError as exc:
            assert exc.reason
            outcomes["rejected"] += 1
        else:  # a mutation that kept the header valid must still satisfy every invariant
            assert header.version == tp.PROTOCOL_VERSION
            assert all(t.nbytes == tp.DTYPE_BYTES[t.dtype] * _numel(t.shape) for t in header.tensors)
            outcomes["valid"] += 1
    assert outcomes["rejected"] > 1000, outcomes


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_peek_transfer_id():
    assert tp.peek_transfer_id(msgpack.packb(_raw(version=9))) == "tid-1"
    assert tp.peek_transfer_id(msgpack.packb(_raw(transfer_id="bad id"))) == ""
    assert tp.peek_transfer_id(b"\xc1") == ""


@pytest.mark.parametrize("field,value", [
    ("transfer_id", "a b"), ("transfer_id", "ok\n"), ("transfer_id", "t" * (tp.MAX_ID_CHARS + 1)),
    ("fingerprint", FP + " "), ("fingerprint", "0" * 65)])
def test_the_sender_refuses_an_id_the_receiver_would(field, value):
    """The header's patterns hold for the whole value when the sender builds it, as when the receiver decodes it
    (pydantic's Field(pattern=…) searches: "a b" held the pattern "a")."""
    ids = {"transfer_id": "tid-1", "request_id": "req 1", "fingerprint": FP, field: value}
    with pytest.raises(ValueError, match=field):
        TransferHeader.from_descriptor(_descriptor(), **ids)
    with pytest.raises(TransferError, match=field):
        TransferHeader.decode(msgpack.packb(_raw(**{field: value})))


def test_a_tensor_name_is_matched_whole():
    d = _descriptor().model_copy(update={"tensors": (TensorSpec(name="layers.0/swa", dtype="uint8", shape=(2,)),)})
    with pytest.raises(ValueError, match="name"):
        TransferHeader.from_descriptor(d, transfer_id="t", request_id="r", fingerprint=FP)


def test_from_descriptor_refuses_an_unknown_dtype():
    d = _descriptor().model_copy(update={"tensors": (TensorSpec(name="x", dtype="complex64", shape=(2,)),)})
    with pytest.raises(ValueError, match="dtype 'complex64' cannot be shipped"):
        TransferHeader.from_descriptor(d, transfer_id="t", request_id="r", fingerprint=FP)


def test_model_fingerprint_is_stable_and_sensitive():
    cfg = get_preset("tiny")
    fp = model_fingerprint(cfg)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    assert fp == model_fingerprint(get_preset("tiny"))
    assert fp == model_fingerprint(cfg.model_dump(mode="json"))
    assert fp != model_fingerprint(get_preset("tiny", window=cfg.window * 2))
    assert fp != model_fingerprint(cfg, extra="seed=1")


def test_fault_plan_parsing():
    assert FaultPlan.parse("drop") == FaultPlan("drop")
    assert FaultPlan.parse("delay:0.25@3") == FaultPlan("delay", 0.25, 3)
    assert FaultPlan.parse("corrupt@1") == FaultPlan("corrupt", 0.0, 1)
    assert FaultPlan.parse("drop_ack").on_sender is False
    assert FaultPlan.from_env({}) is None
    assert FaultPlan.from_env({tp.FAULT_ENV: "truncate"}) == FaultPlan("truncate")
    for bad in ("explode", "delay", "drop:1", "delay:x", "delay:99999"):
        with pytest.raises(ValueError):
            FaultPlan.parse(bad)
    with pytest.raises(ValueError, match=tp.FAULT_ENV):
        FaultPlan.from_env({tp.FAULT_ENV: "nope"})


# --- checksums ---------------------------------------------------------------------------------------
def _crc32c_bitwise(data: bytes, value: int = 0) -> int:
    """CRC32C by its definition, one bit at a time (reflected polynomial 0x82F63B78)."""
    crc = ~value & 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return ~crc & 0xFFFFFFFF


def test_checksums_match_their_check_values():
    assert tp.checksum("crc32c", b"123456789") == tp.crc32c_reference(b"123456789") == 0xE3069283  # RFC 3720
    assert tp.checksum("crc32", b"123456789") == 0xCBF43926
    assert tp.checksum("crc32c", b"") == 0 and tp.crc32c_reference(b"", 0x1234) == 0x1234
    with pytest.raises(ValueError, match="checksum algorithm 'md5'"):
        tp.checksum("md5", b"x")


@pytest.mark.parametrize("size", [0, 1, 17, 4095, 4096, 2**12 + 17, 2**16 + 17, 1823 * 781, 3 * 2**20 + 5])
def test_crc32c_reference_equals_the_definition_and_the_package(size):
    rng = np.random.default_rng(size)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    seed = int(rng.integers(0, 2**32))
    got = tp.crc32c_reference(data, seed)
    if size <= 5000:
        assert got == _crc32c_bitwise(data, seed), f"size={size} seed={seed:08x}"
    cut = size // 3  # chaining: the checksum of a‖b continues from the checksum of a
    assert tp.crc32c_reference(data[cut:], tp.crc32c_reference(data[:cut], seed)) == got
    assert tp.checksum("crc32", data, seed) == zlib.crc32(data, seed)
    crc32c = pytest.importorskip("crc32c")
    assert crc32c.crc32c(data, seed) == got == tp.checksum("crc32c", memoryview(data), seed), f"size={size}"


def test_a_flipped_bit_anywhere_changes_the_checksum():
    rng = np.random.default_rng(7)
    data = bytearray(rng.integers(0, 256, 2**16 + 17, dtype=np.uint8).tobytes())
    want = {name: tp.checksum(name, bytes(data)) for name in tp.CHECKSUMS}
    for i in rng.integers(0, len(data), 64).tolist():
        bit = 1 << int(rng.integers(0, 8))
        data[i] ^= bit
        for name in tp.CHECKSUMS:
            assert tp.checksum(name, bytes(data)) != want[name], f"{name}: byte {i} bit {bit}"
        data[i] ^= bit
