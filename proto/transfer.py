"""P→D state transfer frames (docs/DESIGN.md §5): one versioned msgpack header, then the tensors' raw bytes.

A transfer is one zmq multipart message from a prefill worker's DEALER to a decode worker's ROUTER:

    frame 0        TransferHeader.encode(): msgpack map (version, ids, fingerprint, position, tokens,
                   sampler state, frame_bytes, checksum_algorithm, and per tensor: name, dtype, shape, nbytes,
                   num_frames, checksum)
    frame 1        the authentication tag: header_tag(key, frame 0), empty when the deployment runs without
                   a secret
    frames 2..N+1  every tensor in header order, its bytes cut into max(1, ⌈nbytes / frame_bytes⌉) frames
                   of frame_bytes bytes each (the last one holds the rest)

answered by one frame, Ack.encode() (transfer id, ok, reason). Destinations (pages, slot) never travel:
the receiver writes into the reservation its ticket names, so a sender cannot address memory it was not
given. `decode` checks every field's type, range and size before building a model and raises
TransferError(reason) naming the field, the value and what was expected; it never calls cls(**untrusted).

Integrity: each tensor may carry a checksum of its bytes (all of them or none), by the algorithm the header
names. Version 2 added the algorithm: crc32c (Castagnoli) runs 10-20 GB/s on one core with the `crc32c`
package's SSE4.2/ARMv8 instructions where zlib's crc32, version 1's only algorithm, runs 1-2 GB/s (2-core
AMD EPYC VM, 2026-11-30); crc32 stays for senders without the package. `crc32c_reference` computes the same
values in numpy (~0.2 GB/s) when the package is missing.

Authentication (version 3): the tag is HMAC-SHA256 over frame 0's bytes, keyed with a key derived from the
deployment's secret (sparsepd/cluster_token.py `derive_key(token, "transfer")`). Frame 0 holds the transfer
id, the request id and the fingerprint (the ticket the decode worker issued) and every tensor's size and
checksum, so a peer without the key can neither push a state nor alter a header; a receiver with a key
checks the tag right after the header's version and format, before it looks at its tickets or writes a
byte. Not covered: the payload against deliberate change on the wire (its checksums are CRCs, which detect
accidents, not an attacker able to rewrite bytes in flight), the acks, and confidentiality (nothing is
encrypted: keep the transfer network private).

This module depends on nothing of the project (the router imports proto/): engine types enter through
duck typing (`from_descriptor`) or as an argument (`to_descriptor(StateDescriptor)`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

try:
    import crc32c as _crc32c_package  # hardware CRC32C; crc32c_reference is the fallback
except ImportError:  # pragma: no cover - the package is a dependency
    _crc32c_package = None

PROTOCOL_VERSION = 3  # 2: checksum_algorithm and `checksum` per tensor; 3: frame 1 is the header's HMAC tag
FAULT_ENV = "SPARSEPD_TRANSFER_FAULT"

# Bytes per element of every dtype that may cross; anything else is rejected.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "uint8": 1, "int8": 1, "int32": 4,
               "int64": 8, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1}

CHECKSUMS = ("crc32c", "crc32")  # algorithm names a header may carry

DEFAULT_FRAME_BYTES = 8 << 20
MIN_FRAME_BYTES = 256
MAX_FRAME_BYTES = 1 << 30
MAX_HEADER_BYTES = 4 << 20
MAX_TENSORS = 4096  # a V4 state has ~7 per layer, ~430 for 61 layers
MAX_DIMS = 8
MAX_DIM = 1 << 40
MAX_STATE_BYTES = 1 << 36  # per transfer (and so per tensor)
MAX_FRAMES = 1 << 20
MAX_OUTPUT_IDS = 4096
MAX_TOKEN_ID = 1 << 31
MAX_POSITION = 1 << 31
MAX_SAMPLER_STATE_BYTES = 1 << 16
MAX_ID_CHARS = 256
MAX_REASON_CHARS = 2048
TAG_BYTES = 32  # HMAC-SHA256
_TAG_DOMAIN = b"sparsepd transfer header v3\0"

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_ID = re.compile(rf"[A-Za-z0-9_.:\-]{{1,{MAX_ID_CHARS}}}")
_FINGERPRINT = re.compile(r"[0-9a-f]{8,64}")
# The rules for the two ids a header carries (the checks: request_id_ok, transfer_id_ok), in the words every refusal
# names them by: the router (public request ids, at admission), the prefill worker (a batch's requests and tickets),
# the decode worker (its tickets) and the header's own validation.
REQUEST_ID_RULE = f"1 to {MAX_ID_CHARS} printable characters"
TRANSFER_ID_RULE = f"1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 _ . : -"


def _whole(pattern: re.Pattern) -> str:
    """`pattern` for pydantic's Field(pattern=…), which searches: anchored, so the whole value must match."""
    return f"^(?:{pattern.pattern})$"


class TransferError(RuntimeError):
    """A transfer failed or a frame was rejected; `reason` says which field, value and expectation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TransferTimeout(TransferError):
    """No ack came in time: the endpoint is unreachable, the receiver slow, or a message or ack was lost."""


def num_frames_for(nbytes: int, frame_bytes: int) -> int:
    """Frames of one tensor of nbytes bytes: at least one (an empty tensor travels as an empty frame)."""
    return max(1, -(-nbytes // frame_bytes))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TensorHeader(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_whole(_NAME))
    dtype: Literal[tuple(DTYPE_BYTES)]  # type: ignore[valid-type]
    shape: tuple[int, ...] = Field(max_length=MAX_DIMS)
    nbytes: int = Field(ge=0, le=MAX_STATE_BYTES)
    num_frames: int = Field(ge=1, le=MAX_FRAMES)
    checksum: int | None = Field(None, ge=0, lt=1 << 32, description="of the bytes, by checksum_algorithm")

    @model_validator(mode="after")
    def _consistent(self) -> TensorHeader:
        if any(not 0 <= d < MAX_DIM for d in self.shape):
            raise ValueError(f"tensor {self.name}: shape {self.shape} has a dimension outside [0, 2**40)")
        if self.nbytes != _numel(self.shape) * DTYPE_BYTES[self.dtype]:
            raise ValueError(f"tensor {self.name}: nbytes={self.nbytes}, but {self.dtype} {self.shape} holds "
                             f"{_numel(self.shape) * DTYPE_BYTES[self.dtype]}")
        return self


class TransferHeader(BaseModel):
    """Frame 0 of a transfer; `tensors` lists the payload frames in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = PROTOCOL_VERSION
    transfer_id: str = Field(pattern=_whole(_ID))
    request_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    fingerprint: str = Field(pattern=_whole(_FINGERPRINT))
    position: int = Field(ge=0, le=MAX_POSITION, description="tokens whose KV the state holds")
    num_pages: int = Field(ge=0, le=MAX_POSITION)
    output_ids: tuple[int, ...] = Field(max_length=MAX_OUTPUT_IDS, description="tokens sampled so far")
    sampler_state: bytes = Field(max_length=MAX_SAMPLER_STATE_BYTES)
    frame_bytes: int = Field(DEFAULT_FRAME_BYTES, ge=MIN_FRAME_BYTES, le=MAX_FRAME_BYTES)
    checksum_algorithm: Literal[CHECKSUMS] | None = None  # type: ignore[valid-type]
    tensors: tuple[TensorHeader, ...] = Field(max_length=MAX_TENSORS)

    @model_validator(mode="after")
    def _consistent(self) -> TransferHeader:
        if self.version != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.version} is not supported; this side speaks {PROTOCOL_VERSION}")
        if not request_id_ok(self.request_id):
            raise ValueError(f"request_id {self.request_id!r}: expected {REQUEST_ID_RULE}")
        if any(not 0 <= t < MAX_TOKEN_ID for t in self.output_ids):
            raise ValueError(f"output_ids {list(self.output_ids)} hold a token outside [0, 2**31)")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        for t in self.tensors:
            if t.num_frames != num_frames_for(t.nbytes, self.frame_bytes):
                raise ValueError(f"tensor {t.name}: num_frames={t.num_frames}, but {t.nbytes} bytes in frames of "
                                 f"{self.frame_bytes} make {num_frames_for(t.nbytes, self.frame_bytes)}")
        if self.num_bytes > MAX_STATE_BYTES:
            raise ValueError(f"the state holds {self.num_bytes} bytes, more than the limit {MAX_STATE_BYTES}")
        if self.num_frames > MAX_FRAMES:
            raise ValueError(f"the state needs {self.num_frames} frames, more than the limit {MAX_FRAMES}")
        _check_checksums(self.checksum_algorithm, [t.name for t in self.tensors], [t.checksum for t in self.tensors])
        return self

    @property
    def num_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def num_frames(self) -> int:
        """Payload frames (frame 0, the header, not counted)."""
        return sum(t.num_frames for t in self.tensors)

    # --- to and from the engine's state descriptor ---------------------------------------------------
    @classmethod
    def from_descriptor(cls, descriptor: Any, *, transfer_id: str, request_id: str, fingerprint: str,
                        frame_bytes: int = DEFAULT_FRAME_BYTES) -> TransferHeader:
        """The header for an exported state (engine.state_io.StateDescriptor or anything with its fields)."""
        tensors = tuple(_tensor_header(spec.name, spec.dtype, tuple(spec.shape), frame_bytes)
                        for spec in descriptor.tensors)
        return cls(transfer_id=transfer_id, request_id=request_id, fingerprint=fingerprint,
                   position=descriptor.position, num_pages=descriptor.num_pages,
                   output_ids=tuple(descriptor.output_ids), sampler_state=bytes(descriptor.sampler_state),
                   frame_bytes=frame_bytes, tensors=tensors)

    def to_descriptor(self, descriptor_type: type[BaseModel]) -> Any:
        """The state descriptor this header carries, as `descriptor_type` (engine.state_io.StateDescriptor)."""
        return descriptor_type.model_validate({
            "position": self.position, "num_pages": self.num_pages, "output_ids": self.output_ids,
            "sampler_state": self.sampler_state,
            "tensors": tuple({"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in self.tensors)})

    def specs(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """(name, dtype, shape) of every tensor, in order: what a reservation is compared with."""
        return tuple((t.name, t.dtype, t.shape) for t in self.tensors)

    def reframed(self, frame_bytes: int) -> TransferHeader:
        """The same header with tensors cut into frames of frame_bytes (checksums kept)."""
        tensors = tuple(t.model_copy(update={"num_frames": num_frames_for(t.nbytes, frame_bytes)})
                        for t in self.tensors)
        return self.model_validate({**dict(self), "frame_bytes": frame_bytes, "tensors": tensors})

    def with_checksums(self, algorithm: str | None, values: list[int | None]) -> TransferHeader:
        """The same header with one checksum per tensor (algorithm None and values all None: without)."""
        if len(values) != len(self.tensors):
            raise ValueError(f"{len(values)} checksums for {len(self.tensors)} tensors")
        if algorithm is not None and algorithm not in CHECKSUMS:
            raise ValueError(f"checksum algorithm {algorithm!r}: expected one of {list(CHECKSUMS)} or None")
        if any(v is not None and not (type(v) is int and 0 <= v < 1 << 32) for v in values):
            raise ValueError(f"checksums must be 32-bit unsigned ints, got {values[:5]}")
        _check_checksums(algorithm, [t.name for t in self.tensors], values)
        # model_copy skips re-validating 400+ tensors (~6 ms a state): only the checksums change, checked above
        tensors = tuple(t.model_copy(update={"checksum": v}) for t, v in zip(self.tensors, values, strict=True))
        return self.model_copy(update={"checksum_algorithm": algorithm, "tensors": tensors})

    # --- the wire ------------------------------------------------------------------------------------
    def encode(self) -> bytes:
        return msgpack.packb({
            "version": self.version, "transfer_id": self.transfer_id, "request_id": self.request_id,
            "fingerprint": self.fingerprint, "position": self.position, "num_pages": self.num_pages,
            "output_ids": list(self.output_ids), "sampler_state": self.sampler_state,
            "frame_bytes": self.frame_bytes, "checksum_algorithm": self.checksum_algorithm,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes,
                         "num_frames": t.num_frames, "checksum": t.checksum} for t in self.tensors]},
            use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> TransferHeader:
        """Parse and validate frame 0; raise TransferError naming the first bad field."""
        raw = _unpack(data, MAX_HEADER_BYTES, "transfer header")
        version = _int(raw.get("version"), "version", 0, 1 << 31)  # first: other versions have other fields
        if version != PROTOCOL_VERSION:
            raise TransferError(f"protocol version {version} is not supported; this side speaks {PROTOCOL_VERSION}")
        _check_keys(raw, _HEADER_KEYS, "transfer header")
        transfer_id = _str(raw["transfer_id"], "transfer_id", _ID)
        request_id = _str(raw["request_id"], "request_id", None)
        fingerprint = _str(raw["fingerprint"], "fingerprint", _FINGERPRINT)
        position = _int(raw["position"], "position", 0, MAX_POSITION)
        num_pages = _int(raw["num_pages"], "num_pages", 0, MAX_POSITION)
        output_ids = _list(raw["output_ids"], "output_ids", MAX_OUTPUT_IDS)
        for i, t in enumerate(output_ids):
            _int(t, f"output_ids[{i}]", 0, MAX_TOKEN_ID - 1)
        sampler_state = raw["sampler_state"]
        if type(sampler_state) is not bytes or len(sampler_state) > MAX_SAMPLER_STATE_BYTES:
            raise TransferError(f"sampler_state: expected at most {MAX_SAMPLER_STATE_BYTES} bytes, got "
                                f"{_describe(sampler_state)}")
        frame_bytes = _int(raw["frame_bytes"], "frame_bytes", MIN_FRAME_BYTES, MAX_FRAME_BYTES)
        algorithm = raw["checksum_algorithm"]
        if algorithm is not None and (type(algorithm) is not str or algorithm not in CHECKSUMS):
            raise TransferError(f"checksum_algorithm: expected one of {list(CHECKSUMS)} or nil, got "
                                f"{_describe(algorithm)}")
        tensors = tuple(_decode_tensor(t, i, frame_bytes)
                        for i, t in enumerate(_list(raw["tensors"], "tensors", MAX_TENSORS)))
        try:
            return cls(version=version, transfer_id=transfer_id, request_id=request_id, fingerprint=fingerprint,
                       position=position, num_pages=num_pages, output_ids=tuple(output_ids),
                       sampler_state=sampler_state, frame_bytes=frame_bytes, checksum_algorithm=algorithm,
                       tensors=tensors)
        except ValueError as exc:  # pydantic's ValidationError: cross-field checks (repeats, totals)
            raise TransferError(f"transfer header: {_first_error(exc)}") from None


class Ack(BaseModel):
    """The receiver's answer to one transfer; transfer_id is "" when the header was unreadable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transfer_id: str = Field(max_length=MAX_ID_CHARS)
    ok: bool
    reason: str = Field("", max_length=MAX_REASON_CHARS)

    @classmethod
    def reject(cls, transfer_id: str, reason: str) -> Ack:
        return cls(transfer_id=transfer_id, ok=False, reason=reason[:MAX_REASON_CHARS])

    def encode(self) -> bytes:
        return msgpack.packb({"transfer_id": self.transfer_id, "ok": self.ok, "reason": self.reason},
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Ack:
        raw = _unpack(data, 4 * MAX_REASON_CHARS + 1024, "ack")
        _check_keys(raw, {"transfer_id", "ok", "reason"}, "ack")
        transfer_id = _str(raw["transfer_id"], "ack transfer_id", _ID, allow_empty=True)
        if type(raw["ok"]) is not bool:
            raise TransferError(f"ack ok: expected a bool, got {_describe(raw['ok'])}")
        reason = raw["reason"]
        if type(reason) is not str or len(reason) > MAX_REASON_CHARS:
            raise TransferError(f"ack reason: expected a string of at most {MAX_REASON_CHARS} characters, got "
                                f"{_describe(reason)}")
        return cls(transfer_id=transfer_id, ok=raw["ok"], reason=reason)


def header_tag(key: bytes | None, header: bytes | memoryview) -> bytes:
    """Frame 1 for this encoded header: HMAC-SHA256 under `key`, or empty without a key."""
    if key is None:
        return b""
    return hmac.new(key, _TAG_DOMAIN + bytes(header), hashlib.sha256).digest()


def check_tag(key: bytes | None, header: bytes | memoryview, tag: bytes | memoryview) -> None:
    """Raise TransferError("unauthenticated: …") unless `tag` is the header's tag under `key` (constant-time);
    a receiver without a key takes any tag."""
    if key is None:
        return
    if len(tag) == 0:
        raise TransferError("unauthenticated: the message carries no tag (the sender has no deployment secret)")
    if len(tag) != TAG_BYTES or not hmac.compare_digest(bytes(tag), header_tag(key, header)):
        raise TransferError("unauthenticated: the header's tag does not verify under this deployment's secret")


def peek_transfer_id(data: bytes | memoryview) -> str:
    """The transfer id of a header that failed validation, when it can be read at all (else "")."""
    try:
        raw = _unpack(data, MAX_HEADER_BYTES, "transfer header")
        value = raw.get("transfer_id")
        return value if type(value) is str and _ID.fullmatch(value) else ""
    except TransferError:
        return ""


def request_id_ok(value: str) -> bool:
    """A request id a header can carry: REQUEST_ID_RULE."""
    return 0 < len(value) <= MAX_ID_CHARS and value.isprintable()


def transfer_id_ok(value: str) -> bool:
    """A transfer id a header can carry: TRANSFER_ID_RULE."""
    return bool(_ID.fullmatch(value))


def model_fingerprint(cfg: BaseModel | Mapping[str, Any], extra: str = "") -> str:
    """sha256 (16 hex digits) of the model config as canonical JSON, plus `extra` (e.g. a weights id).

    Two workers agree when they run the same architecture, numerics and serving geometry; the config does
    not name the weights, so pass a checkpoint or seed id as `extra` when that must match too.
    """
    values = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    text = json.dumps(values, sort_keys=True, separators=(",", ":")) + "\0" + extra
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- checksums -----------------------------------------------------------------------------------------
def preferred_checksum() -> str:
    """A sender's algorithm: crc32c with the hardware package, else zlib's crc32 (faster than the numpy CRC32C)."""
    return "crc32c" if _crc32c_package is not None else "crc32"


def checksum(algorithm: str, data: Any, value: int = 0) -> int:
    """The `algorithm` checksum of a bytes-like `data`, continuing `value` (the checksum of what came before)."""
    if algorithm == "crc32c":
        if _crc32c_package is not None:
            return _crc32c_package.crc32c(data, value)  # releases the GIL on large buffers
        return crc32c_reference(data, value)
    if algorithm == "crc32":
        return zlib.crc32(data, value)
    raise ValueError(f"checksum algorithm {algorithm!r}: expected one of {list(CHECKSUMS)}")


_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reflected
_MASK = 0xFFFFFFFF


def crc32c_reference(data: Any, value: int = 0) -> int:
    """CRC32C in numpy, equal to crc32c.crc32c(data, value); ~0.1 GB/s.

    The register update over two bytes, s → T2[(s ^ w) & 0xFFFF] ^ (s >> 16) (w: the bytes as a little-endian
    uint16), is linear over GF(2) (Z_n: its map over n zero bytes, a 32×32 bit matrix). So the data is read
    as chunks of `lanes` 64-byte segments; lane i runs over segment i of every chunk in lockstep with the
    others (its register jumped by Z over the (lanes-1)·64 bytes between), and at the end the lanes merge
    pairwise, R(a‖b) = Z_|b|(R(a)) ^ R(b). Columns one cache line apart keep the reads sequential.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    state = ~value & _MASK
    while buf.size >= 1 << 12:
        lanes = 1 << min(12, (buf.size >> 6).bit_length() - 1)  # 64..4096 lanes
        chunks = buf.size // (64 * lanes)
        words = buf[: chunks * lanes * 64].view(np.uint16).reshape(chunks, lanes, 32)
        table, gap = _crc32c_table2(), _byte_tables(_zeros_map(64 * (lanes - 1)))
        regs = np.zeros(lanes, dtype=np.int64)
        for c in range(chunks):
            block = words[c] if sys.byteorder == "little" else words[c].byteswap()
            if c:  # Z over the other lanes' bytes, as four byte lookups
                regs = (gap[0, regs & 0xFF] ^ gap[1, (regs >> 8) & 0xFF] ^ gap[2, (regs >> 16) & 0xFF]
                        ^ gap[3, regs >> 24])
            for j in range(32):
                regs = table[(regs ^ block[:, j]) & 0xFFFF] ^ (regs >> 16)
        regs, zeros = regs.astype(np.uint32), _zeros_map(64)
        while regs.size > 1:  # merge neighbours: the left one's register runs over the right one's length
            regs = _apply(zeros, regs[0::2]) ^ regs[1::2]
            zeros = _apply(zeros, zeros)  # Z_2n = Z_n ∘ Z_n
        state = int(_apply(_zeros_map(chunks * lanes * 64), np.array([state], dtype=np.uint32))[0]) ^ int(regs[0])
        buf = buf[chunks * lanes * 64:]
    table = _crc32c_table()
    for byte in buf.tolist():
        state = int(table[(state ^ byte) & 0xFF]) ^ (state >> 8)
    return ~state & _MASK


@functools.cache
def _crc32c_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1)
    return table  # [256] uint32


@functools.cache
def _crc32c_table2() -> np.ndarray:
    """T2[v] = Z_2(v): the register v (< 2**16) after two zero bytes."""
    return _apply(_zeros_map(2), np.arange(1 << 16, dtype=np.uint32)).astype(np.int64)  # [65536]


@functools.lru_cache(maxsize=64)
def _zeros_map(num_bytes: int) -> np.ndarray:
    """Z_n as its 32 columns (the images of 1 << i): Z_1 from the table, then by squaring."""
    table = _crc32c_table()
    one = np.array([int(table[(1 << i) & 0xFF]) ^ ((1 << i) >> 8) for i in range(32)], dtype=np.uint32)
    result, power, n = 1 << np.arange(32, dtype=np.uint32), one, num_bytes
    while n:
        if n & 1:
            result = _apply(power, result)
        power, n = _apply(power, power), n >> 1
    return result  # [32] uint32


def _byte_tables(columns: np.ndarray) -> np.ndarray:
    """The map as four 256-entry tables, one per byte of its argument."""
    return np.stack([_apply(columns, np.arange(256, dtype=np.uint32) << np.uint32(8 * k)) for k in range(4)]
                    ).astype(np.int64)  # [4, 256]


def _apply(columns: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The linear map with these 32 columns applied to every element of x (uint32)."""
    out = np.zeros_like(x)
    for i in range(32):
        out ^= np.where((x >> np.uint32(i)) & 1, columns[i], np.uint32(0))
    return out


# --- fault injection ---------------------------------------------------------------------------------
SENDER_FAULTS = ("drop", "delay", "truncate", "corrupt")
RECEIVER_FAULTS = ("drop_ack", "delay_ack")


@dataclass(frozen=True)
class FaultPlan:
    """A deliberate transfer fault, for tests and drills (off unless given or set in SPARSEPD_TRANSFER_FAULT).

    Sender kinds: drop (never send), delay (send delay_s late), truncate (cut the last payload frame in
    half), corrupt (flip one byte of the first non-empty payload frame; only checksums catch it).
    Receiver kinds: drop_ack (accept, never answer), delay_ack (answer delay_s late). `limit` bounds the
    transfers affected (None = all). Text form: KIND, KIND:SECONDS, optionally @LIMIT (`delay:0.5@3`).
    """

    kind: Literal["drop", "delay", "truncate", "corrupt", "drop_ack", "delay_ack"]
    delay_s: float = 0.0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SENDER_FAULTS + RECEIVER_FAULTS:
            raise ValueError(f"fault kind {self.kind!r}: expected one of {SENDER_FAULTS + RECEIVER_FAULTS}")
        if not 0.0 <= self.delay_s <= 3600.0:
            raise ValueError(f"fault delay_s={self.delay_s}: expected seconds in [0, 3600]")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"fault limit={self.limit}: expected ≥ 0 or None")

    @property
    def on_sender(self) -> bool:
        return self.kind in SENDER_FAULTS

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        m = re.fullmatch(r"([a-z_]+)(?::([0-9.]+))?(?:@([0-9]+))?", text.strip())
        if m is None:
            raise ValueError(f"fault {text!r}: expected KIND[:SECONDS][@LIMIT] with KIND one of "
                             f"{SENDER_FAULTS + RECEIVER_FAULTS}")
        kind, seconds, limit = m.groups()
        if (seconds is not None) != (kind in ("delay", "delay_ack")):
            raise ValueError(f"fault {text!r}: delay and delay_ack take :SECONDS, the other kinds none")
        return cls(kind, float(seconds or 0.0), int(limit) if limit is not None else None)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FaultPlan | None:
        text = env.get(FAULT_ENV, "").strip()
        if not text:
            return None
        try:
            return cls.parse(text)
        except ValueError as exc:
            raise ValueError(f"{FAULT_ENV}: {exc}") from None


# --- validation of untrusted maps ----------------------------------------------------------------------
_HEADER_KEYS = {"version", "transfer_id", "request_id", "fingerprint", "position", "num_pages", "output_ids",
                "sampler_state", "frame_bytes", "checksum_algorithm", "tensors"}
_TENSOR_KEYS = {"name", "dtype", "shape", "nbytes", "num_frames", "checksum"}


def _unpack(data: bytes | memoryview, limit: int, what: str) -> dict:
    if len(data) > limit:
        raise TransferError(f"{what}: {len(data)} bytes, more than the limit {limit}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on bad input
        raise TransferError(f"{what}: malformed msgpack ({type(exc).__name__}: {exc})") from None
    if type(raw) is not dict:
        raise TransferError(f"{what}: expected a msgpack map, got {_describe(raw)}")
    return raw


def _check_keys(raw: dict, want: set[str], what: str) -> None:
    if set(raw) != want:
        missing, extra = sorted(want - set(raw)), sorted(set(raw) - want, key=str)
        raise TransferError(f"{what}: missing fields {missing}, unexpected fields {extra}")


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def _int(value: object, label: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise TransferError(f"{label}: expected an int in [{lo}, {hi}], got {_describe(value)}")
    return value


def _str(value: object, label: str, pattern: re.Pattern | None, allow_empty: bool = False) -> str:
    ok = type(value) is str and ((allow_empty and value == "") or bool(
        pattern.fullmatch(value) if pattern is not None else request_id_ok(value)))
    if not ok:
        want = f"matching {pattern.pattern}" if pattern is not None else f"of {REQUEST_ID_RULE}"
        raise TransferError(f"{label}: expected a string {want}, got {_describe(value)}")
    return value  # type: ignore[return-value]


def _list(value: object, label: str, limit: int) -> list:
    if type(value) is not list or len(value) > limit:
        raise TransferError(f"{label}: expected a list of at most {limit} items, got {_describe(value)}")
    return value


def _decode_tensor(raw: object, i: int, frame_bytes: int) -> TensorHeader:
    where = f"tensors[{i}]"
    if type(raw) is not dict:
        raise TransferError(f"{where}: expected a map, got {_describe(raw)}")
    _check_keys(raw, _TENSOR_KEYS, where)
    name = _str(raw["name"], f"{where} name", _NAME)
    where = f"tensor {name}"
    dtype = raw["dtype"]
    if type(dtype) is not str or dtype not in DTYPE_BYTES:
        raise TransferError(f"{where} dtype: expected one of {sorted(DTYPE_BYTES)}, got {_describe(dtype)}")
    shape = raw["shape"]
    if type(shape) is not list or len(shape) > MAX_DIMS or any(type(d) is not int or not 0 <= d < MAX_DIM
                                                               for d in shape):
        raise TransferError(f"{where} shape: expected at most {MAX_DIMS} ints in [0, 2**40), got {_describe(shape)}")
    nbytes = _int(raw["nbytes"], f"{where} nbytes", 0, MAX_STATE_BYTES)
    if nbytes != _numel(tuple(shape)) * DTYPE_BYTES[dtype]:
        raise TransferError(f"{where} nbytes: {dtype} {tuple(shape)} holds "
                            f"{_numel(tuple(shape)) * DTYPE_BYTES[dtype]} bytes, the header says {nbytes}")
    num_frames = _int(raw["num_frames"], f"{where} num_frames", 1, MAX_FRAMES)
    if num_frames != num_frames_for(nbytes, frame_bytes):
        raise TransferError(f"{where} num_frames: {nbytes} bytes in frames of {frame_bytes} make "
                            f"{num_frames_for(nbytes, frame_bytes)}, the header says {num_frames}")
    value = raw["checksum"]
    if value is not None:
        value = _int(value, f"{where} checksum", 0, (1 << 32) - 1)
    # every field checked above, as TensorHeader's validators would (~12 ms less for a 229-tensor state)
    return TensorHeader.model_construct(name=name, dtype=dtype, shape=tuple(shape), nbytes=nbytes,
                                        num_frames=num_frames, checksum=value)


def _check_checksums(algorithm: str | None, names: list[str], values: list[int | None]) -> None:
    """Every tensor carries a checksum when the header names an algorithm, none when it names none."""
    if algorithm is None:
        carrying = [n for n, v in zip(names, values, strict=True) if v is not None]
        if carrying:
            raise ValueError(f"tensors {carrying[:5]} carry a checksum but checksum_algorithm is nil")
    else:
        missing = [n for n, v in zip(names, values, strict=True) if v is None]
        if missing:
            raise ValueError(f"checksum_algorithm is {algorithm}, but tensors {missing[:5]} carry no checksum")


def _tensor_header(name: str, dtype: str, shape: tuple[int, ...], frame_bytes: int) -> TensorHeader:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"tensor {name}: dtype {dtype!r} cannot be shipped; allowed: {sorted(DTYPE_BYTES)}")
    nbytes = _numel(shape) * DTYPE_BYTES[dtype]
    return TensorHeader(name=name, dtype=dtype, shape=shape, nbytes=nbytes,
                        num_frames=num_frames_for(nbytes, frame_bytes))


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    e = errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    return f"{loc + ': ' if loc else ''}{e['msg'].removeprefix('Value error, ')}"
