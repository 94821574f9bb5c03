"""Receive shipped request states on a decode worker (docs/DESIGN.md §5, proto/transfer.py).

`TransferReceiver` binds a ROUTER socket (tcp://HOST:PORT, port 0 = any free one, or ipc://PATH; the bound
address is `endpoint`) and serves it from its own thread, so a transfer never blocks the decode loop.

Tickets: the worker calls `expect(transfer_id, request_id, specs, deadline_s, max_pages)` when it reserves
pages and `cancel(transfer_id)` when it releases them. For each message the thread checks, in order, the
header (version, every field, limits), its authentication tag (with `auth_key`: an HMAC under the
deployment's secret; a failure is counted as `unauthenticated`, and the message touches no ticket), the
fingerprint, the ticket (known, not cancelled, expired or already received), the request id, num_pages ≤
max_pages, the tensor list (name, dtype, shape, in order) against the reservation's specs for that num_pages,
the frame count, every frame's size and each tensor's checksum (crc32c or crc32, as the header names;
`require_checksum` refuses a state without).
Only then does it build the tensors — views of the received frames when a tensor came in one frame, one
copy when it came in several — and call `on_state(transfer_id, descriptor, tensors)`, then answer
Ack(ok). Any failure answers Ack(False, reason), hands nothing over and keeps the ticket (a retry may
follow); the thread never dies on a bad message. After a success the ticket is closed: a repeat is
rejected as "already received".

`on_state` runs on the receiver's thread and must be quick (queue the state for the decode loop, which
copies it into the pools between steps); its exception becomes a rejection. The tensors are CPU tensors
over the received buffers (pageable memory), valid as long as they are referenced. Expired tickets are
dropped by the thread and reported through `on_expire(transfer_id, request_id)` so the worker frees pages.

Memory: libzmq mallocs every received frame and the last reference frees it. With glibc's defaults the
freed megabytes go back to the kernel and the next transfer page-faults fresh zeroed pages: on a 2-core
VM that cost the receiving I/O thread more than the socket copy itself (91 ms vs 47 ms of CPU per 224 MB,
2026-11-30). `retain_memory=True` (the default) sets glibc's malloc, for this process, to keep freed chunks
up to 32 MiB for reuse (M_MMAP_THRESHOLD, M_TOP_PAD): the process keeps its peak of in-flight states.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import itertools
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import zmq

from sparsepd.engine.state_io import StateDescriptor
from sparsepd.proto.transfer import (
    DTYPE_BYTES,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    REQUEST_ID_RULE,
    TRANSFER_ID_RULE,
    Ack,
    FaultPlan,
    TensorHeader,
    TransferError,
    TransferHeader,
    check_tag,
    checksum,
    peek_transfer_id,
    request_id_ok,
    transfer_id_ok,
)

log = logging.getLogger("sparsepd.transfer")

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_BYTES}  # the proto's allow-list only

Spec = tuple[str, str, tuple[int, ...]]  # name, dtype, shape
SpecsFn = Callable[[int], Sequence]  # num_pages → TensorSpec-likes (name, dtype, shape attributes)
OnState = Callable[[str, StateDescriptor, dict[str, torch.Tensor]], None]


@dataclass
class _Ticket:
    request_id: str
    specs: Sequence | SpecsFn
    expires_at: float  # monotonic
    max_pages: int | None


class TransferReceiver:
    def __init__(self, endpoint: str, fingerprint: str, on_state: OnState, *,
                 expected: Callable[[str, int], Sequence] | None = None,
                 on_expire: Callable[[str, str], None] | None = None, context: zmq.Context | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES, require_checksum: bool = False,
                 fault: FaultPlan | None = None, history: int = 4096, retain_memory: bool = True,
                 auth_key: bytes | None = None):
        """`expected(transfer_id, num_pages)` gives the specs of tickets registered without their own;
        auth_key: the key every header's tag must verify under (None: no authentication)."""
        if retain_memory:
            retain_freed_memory()
        self.fingerprint, self.on_state, self.on_expire, self.expected = fingerprint, on_state, on_expire, expected
        self.require_checksum, self.history, self.auth_key = require_checksum, history, auth_key
        plan = fault if fault is not None else FaultPlan.from_env()
        self.fault = plan if plan is not None and not plan.on_sender else None
        self._faults_left = self.fault.limit if self.fault is not None else None
        self.stats: Counter[str] = Counter()  # accepted, rejected, unauthenticated, expired, cancelled, bytes
        self._tickets: dict[str, _Ticket] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # transfer id → why it takes no more messages
        self._lock = threading.Lock()
        self._delayed_acks: list[tuple[float, int, bytes, bytes]] = []
        self._seq = itertools.count()
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, max(max_frame_bytes, MAX_HEADER_BYTES))  # per frame; larger: dropped
        try:
            self._router.bind(endpoint)
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            if self._own_context:
                self._context.term()
            raise OSError(f"cannot bind the transfer receiver to {endpoint!r}: {exc}") from None
        self.endpoint: str = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-receiver", daemon=True)
        self._thread.start()

    # --- any thread --------------------------------------------------------------------------------
    def expect(self, transfer_id: str, request_id: str, specs: Sequence | SpecsFn | None = None,
               deadline_s: float = 30.0, max_pages: int | None = None) -> None:
        """Open a ticket: accept one state for request_id within deadline_s seconds from now.

        specs: the tensors (objects with name, dtype, shape: engine.state_io.TensorSpec) the state must
        carry, or a function num_pages → specs (the layout depends on the pages shipped), or None to use
        the receiver's `expected`. max_pages: the most pages the reservation holds.
        """
        if not transfer_id_ok(transfer_id):
            raise ValueError(f"transfer_id {transfer_id!r}: expected {TRANSFER_ID_RULE}")
        if not request_id_ok(request_id):
            raise ValueError(f"request_id {request_id!r}: expected {REQUEST_ID_RULE}")
        if specs is None:
            if self.expected is None:
                raise ValueError("expect() needs specs when the receiver was built without `expected`")
            specs = functools.partial(self.expected, transfer_id)
        if not deadline_s > 0:
            raise ValueError(f"deadline_s={deadline_s}: expected seconds > 0")
        if max_pages is not None and max_pages < 0:
            raise ValueError(f"max_pages={max_pages}: expected ≥ 0")
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the transfer receiver is closed")
            if transfer_id in self._tickets or transfer_id in self._closed:
                raise ValueError(f"transfer_id {transfer_id!r} was already used on this receiver")
            self._tickets[transfer_id] = _Ticket(request_id, specs, time.monotonic() + deadline_s, max_pages)
            os.write(self._wake_w, b"e")  # the thread recomputes its next expiry

    def cancel(self, transfer_id: str, why: str = "the reservation was cancelled") -> bool:
        """Close a ticket (its reservation was released or expired); False if it was not open."""
        with self._lock:
            found = self._tickets.pop(transfer_id, None) is not None
            if found:
                self._close(transfer_id, why)
                self.stats["cancelled"] += 1
        return found

    @property
    def num_tickets(self) -> int:
        with self._lock:
            return len(self._tickets)

    def close(self) -> None:
        """Stop the thread and close the socket with linger=0 (open tickets are dropped; idempotent)."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
        os.write(self._wake_w, b"c")
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.error("transfer receiver thread did not stop within 10 s; leaving its socket")
            return
        self._router.close(linger=0)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> TransferReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the receiver's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                for sock, _ in poller.poll(self._poll_timeout_ms()):
                    if sock == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif sock is self._router:
                        while not self._stop.is_set() and self._router.poll(0):
                            self._on_message(self._router.recv_multipart(copy=False))
                self._send_delayed_acks()
                self._expire()
            except Exception:  # noqa: BLE001 - a bug on one message must not stop the receiver
                log.exception("transfer receiver: unexpected error (the thread goes on)")

    def _poll_timeout_ms(self) -> int:
        with self._lock:
            times = [t.expires_at for t in self._tickets.values()]
        times += [t for t, *_ in self._delayed_acks[:1]]
        if not times:
            return 1000
        return max(0, min(1000, int((min(times) - time.monotonic()) * 1000) + 1))

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        identity, parts = frames[0].bytes, frames[1:]
        header = None
        try:
            if not parts:
                raise TransferError("empty message: no header frame")
            header = TransferHeader.decode(parts[0].buffer)
            try:
                check_tag(self.auth_key, parts[0].buffer, parts[1].buffer if len(parts) > 1 else b"")
            except TransferError:
                self.stats["unauthenticated"] += 1
                raise
            specs = self._check_ticket(header)
            if header.specs() != specs:
                raise TransferError(_specs_mismatch(header.specs(), specs))
            tensors = self._tensors(header, parts[2:])
            descriptor = header.to_descriptor(StateDescriptor)
            self._claim(header)
        except TransferError as exc:
            tid = header.transfer_id if header is not None else (peek_transfer_id(parts[0].buffer) if parts else "")
            self.stats["rejected"] += 1
            log.warning("transfer %r rejected: %s", tid, exc.reason,
                        extra={"request_id": header.request_id if header is not None else ""})
            self._reply(identity, Ack.reject(tid, exc.reason))
            return
        tid = header.transfer_id
        try:
            self.on_state(tid, descriptor, tensors)
        except Exception as exc:  # noqa: BLE001 - the worker's refusal goes back to the sender as a reason
            log.exception("on_state failed for transfer %s", tid)
            with self._lock:
                self._close(tid, f"the decode worker refused the state: {exc}")
            self._reply(identity, Ack.reject(tid, f"the decode worker refused the state: {exc}"))
            return
        self.stats["accepted"] += 1
        self.stats["bytes"] += header.num_bytes
        self._reply(identity, Ack(transfer_id=tid, ok=True))

    def _check_ticket(self, header: TransferHeader) -> tuple[Spec, ...]:
        """The ticket's specs for this header, or TransferError saying why the ticket does not admit it."""
        tid = header.transfer_id
        if header.fingerprint != self.fingerprint:
            raise TransferError(f"model fingerprint {header.fingerprint} does not match this worker's "
                                f"{self.fingerprint}: the two workers run different models")
        with self._lock:
            ticket = self._tickets.get(tid)
            if ticket is None:
                raise TransferError(f"transfer {tid}: {self._closed.get(tid, 'unknown transfer id (no reservation)')}")
            if ticket.expires_at < time.monotonic():
                del self._tickets[tid]
                self._close(tid, "the reservation expired")
                self.stats["expired"] += 1
                expired = True
            else:
                expired = False
        if expired:
            self._notify_expired(tid, ticket.request_id)
            raise TransferError(f"transfer {tid}: the reservation expired")
        if header.request_id != ticket.request_id:
            raise TransferError(f"transfer {tid} belongs to request {ticket.request_id!r}, "
                                f"the header names {header.request_id!r}")
        if ticket.max_pages is not None and header.num_pages > ticket.max_pages:
            raise TransferError(f"the state has {header.num_pages} pages, the reservation holds {ticket.max_pages}")
        try:
            specs = ticket.specs(header.num_pages) if callable(ticket.specs) else ticket.specs
            return tuple((s.name, s.dtype, tuple(s.shape)) for s in specs)
        except Exception as exc:  # noqa: BLE001 - a spec function refusing num_pages is a rejection
            raise TransferError(f"no state layout for num_pages={header.num_pages}: {exc}") from None

    def _tensors(self, header: TransferHeader, frames: list[zmq.Frame]) -> dict[str, torch.Tensor]:
        if len(frames) != header.num_frames:
            raise TransferError(f"expected {header.num_frames} payload frames, got {len(frames)} (truncated message?)")
        groups, start = [], 0
        for t in header.tensors:
            parts = frames[start: start + t.num_frames]
            start += t.num_frames
            for k, frame in enumerate(parts):
                want = min(header.frame_bytes, t.nbytes - k * header.frame_bytes)
                if len(frame) != want:
                    raise TransferError(f"tensor {t.name} frame {k}: {len(frame)} bytes, expected {want} "
                                        f"(truncated or corrupted)")
            groups.append((t, parts))
        algorithm = header.checksum_algorithm
        if algorithm is None and self.require_checksum:
            raise TransferError("the state carries no checksum and this receiver requires one")
        for t, parts in groups if algorithm is not None else ():
            value = 0
            for frame in parts:
                value = checksum(algorithm, frame.buffer, value)
            if value != t.checksum:
                raise TransferError(f"tensor {t.name}: {algorithm} {value:08x} != header {t.checksum:08x} (corrupted)")
        return {t.name: _assemble(t, parts) for t, parts in groups}

    def _claim(self, header: TransferHeader) -> None:
        """Close the ticket for this header (it may have been cancelled while the frames were checked)."""
        tid = header.transfer_id
        with self._lock:
            if self._tickets.pop(tid, None) is None:
                raise TransferError(f"transfer {tid}: {self._closed.get(tid, 'unknown transfer id')}")
            self._close(tid, "already received")

    def _close(self, transfer_id: str, why: str) -> None:
        """Remember why a ticket takes no more messages (the last `history` ones); hold the lock."""
        self._closed[transfer_id] = why
        self._closed.move_to_end(transfer_id)
        while len(self._closed) > self.history:
            self._closed.popitem(last=False)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [(tid, t.request_id) for tid, t in self._tickets.items() if t.expires_at < now]
            for tid, _ in expired:
                del self._tickets[tid]
                self._close(tid, "the reservation expired")
                self.stats["expired"] += 1
        for tid, request_id in expired:
            self._notify_expired(tid, request_id)

    def _notify_expired(self, transfer_id: str, request_id: str) -> None:
        log.warning("transfer %s: the reservation expired before its state arrived", transfer_id,
                    extra={"request_id": request_id})
        if self.on_expire is not None:
            try:
                self.on_expire(transfer_id, request_id)
            except Exception:  # noqa: BLE001
                log.exception("on_expire failed for transfer %s", transfer_id)

    def _reply(self, identity: bytes, ack: Ack) -> None:
        if self.fault is not None and self._faults_left != 0:
            if self._faults_left is not None:
                self._faults_left -= 1
            if self.fault.kind == "drop_ack":
                return
            heapq.heappush(self._delayed_acks, (time.monotonic() + self.fault.delay_s, next(self._seq), identity,
                                                ack.encode()))
            return
        self._send_ack(identity, ack.encode())

    def _send_delayed_acks(self) -> None:
        now = time.monotonic()
        while self._delayed_acks and self._delayed_acks[0][0] <= now:
            _, _, identity, data = heapq.heappop(self._delayed_acks)
            self._send_ack(identity, data)

    def _send_ack(self, identity: bytes, data: bytes) -> None:
        try:
            self._router.send_multipart([identity, data], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the sender went away or its queue is full: it will time out
            log.warning("ack not delivered: %s", exc)


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed chunks up to 32 MiB in this process (see the module's docstring).

    M_MMAP_THRESHOLD fixed at 32 MiB (its maximum) serves frames up to that size from the heaps instead of
    fresh mmaps; M_TOP_PAD of 64 MiB (a thread arena's heap size) keeps a freed heap mapped instead of
    unmapping it. Idempotent; False (and nothing changed) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    m_top_pad, m_mmap_threshold = -2, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_top_pad, 64 << 20))


def _assemble(t: TensorHeader, parts: list[zmq.Frame]) -> torch.Tensor:
    """The tensor over the received bytes: no copy for one aligned frame, one copy for several."""
    dtype = TORCH_DTYPES[t.dtype]
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=dtype)
    if len(parts) == 1:
        flat = torch.frombuffer(parts[0].buffer, dtype=torch.uint8)
        if flat.data_ptr() % DTYPE_BYTES[t.dtype]:
            flat = flat.clone()
    else:
        flat = torch.empty(t.nbytes, dtype=torch.uint8)
        offset = 0
        for frame in parts:
            flat[offset: offset + len(frame)] = torch.frombuffer(frame.buffer, dtype=torch.uint8)
            offset += len(frame)
    return flat.view(dtype).view(t.shape)


def _specs_mismatch(got: tuple[Spec, ...], want: tuple[Spec, ...]) -> str:
    names_got, names_want = [s[0] for s in got], [s[0] for s in want]
    if names_got != names_want:
        missing, extra = sorted(set(names_want) - set(names_got)), sorted(set(names_got) - set(names_want))
        return (f"tensor list does not match the reservation: missing {missing[:5]}, unexpected {extra[:5]}"
                + ("" if missing or extra else " (order differs)"))
    for (name, dtype, shape), (_, want_dtype, want_shape) in zip(got, want, strict=True):
        if (dtype, shape) != (want_dtype, want_shape):
            return f"tensor {name}: the header says {dtype} {shape}, the reservation expects {want_dtype} {want_shape}"
    return "tensor list does not match the reservation"
