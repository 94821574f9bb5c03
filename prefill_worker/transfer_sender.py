"""Push exported request states to decode workers over zmq (docs/DESIGN.md §5, proto/transfer.py).

`TransferSender.send(endpoint, header, tensors)` returns a `concurrent.futures.Future[Ack]` at once
(`asyncio.wrap_future` makes it awaitable). The future resolves with the receiver's Ack — ok, or a
rejection with its reason — or fails with `TransferTimeout` (no ack within ack_timeout_s: the reason says
whether the endpoint ever accepted a connection) or `TransferError` (sender closed, queue full).

One background thread owns every zmq socket (sockets are not thread-safe): `send` hands it a job through a
queue and wakes it through a pipe; the thread keeps one DEALER per endpoint (reused), sends each state as
one multipart message (the header, its tag under `auth_key`, then the payload) whose payload frames are
memoryviews of the tensors (`copy=False`: no copy on this
side), tensors larger than max_frame_bytes cut into several frames, computes the optional checksum per
tensor (crc32c by default: 10-20 GB/s on one core with the hardware package, zlib's crc32 without it, 1-2
GB/s; off the caller's thread), matches acks to futures, and times transfers out.
The caller must not write into the tensors until the future is done (they are referenced until then).

A timed-out transfer is not proof that the receiver refused it (the ack may be lost): whoever owns the
request must release the decode side's reservation. Future callbacks run on the sender's thread: keep
them short. Fault injection (off by default): `fault=FaultPlan(...)` or SPARSEPD_TRANSFER_FAULT.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Literal

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from sparsepd.proto.transfer import (
    CHECKSUMS,
    DEFAULT_FRAME_BYTES,
    DTYPE_BYTES,
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    Ack,
    FaultPlan,
    TransferError,
    TransferHeader,
    TransferTimeout,
    checksum,
    header_tag,
    preferred_checksum,
)

log = logging.getLogger("sparsepd.transfer")

_DTYPE_NAMES = {getattr(torch, name): name for name in DTYPE_BYTES}  # torch dtype → the header's name

_MONITOR_EVENTS = {zmq.EVENT_CONNECTED: "connected", zmq.EVENT_DISCONNECTED: "disconnected",
                   zmq.EVENT_CONNECT_RETRIED: "connection refused, retrying",
                   zmq.EVENT_CLOSED: "closed"}
_MONITOR_MASK = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED


@dataclass
class _Job:
    endpoint: str
    header: TransferHeader
    payload: list[memoryview]  # one byte view per tensor, in header order
    future: Future
    deadline: float  # monotonic
    note: str = ""  # what fault injection did, for the timeout's reason


@dataclass
class _Peer:
    socket: zmq.Socket
    monitor: zmq.Socket
    state: str = "connecting"
    ever_connected: bool = False
    sent: deque[str] = field(default_factory=deque)  # transfer ids awaiting an ack, oldest first


class TransferSender:
    def __init__(self, context: zmq.Context | None = None, *, max_frame_bytes: int = DEFAULT_FRAME_BYTES,
                 ack_timeout_s: float = 10.0, checksum: bool | Literal["crc32c", "crc32"] = True,
                 fault: FaultPlan | None = None, auth_key: bytes | None = None):
        """checksum: True for the fastest algorithm here (crc32c with the hardware package, else crc32),
        an algorithm's name, or False to send none (a receiver may require one). auth_key: the key each
        header is tagged with (sparsepd.cluster_token.derive_key(token, "transfer")); None sends no tag."""
        if not MIN_FRAME_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes={max_frame_bytes}: expected [{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}]")
        if not ack_timeout_s > 0:
            raise ValueError(f"ack_timeout_s={ack_timeout_s}: expected > 0")
        if checksum is not True and checksum is not False and checksum not in CHECKSUMS:
            raise ValueError(f"checksum={checksum!r}: expected True, False or one of {list(CHECKSUMS)}")
        self.max_frame_bytes, self.ack_timeout_s, self.auth_key = max_frame_bytes, ack_timeout_s, auth_key
        self.checksum: str | None = preferred_checksum() if checksum is True else (checksum or None)
        plan = fault if fault is not None else FaultPlan.from_env()
        self.fault = plan if plan is not None and plan.on_sender else None
        self._faults_left = self.fault.limit if self.fault is not None else None
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._peers: dict[str, _Peer] = {}
        self._by_socket: dict[zmq.Socket, str] = {}  # a peer's socket or monitor → its endpoint
        self._pending: dict[str, _Job] = {}
        self._delayed: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._closed = threading.Event()  # no more sends
        self._stopping = False  # close() has begun
        self._lock = threading.Lock()  # orders send() against close()
        self._thread = threading.Thread(target=self._run, name="transfer-sender", daemon=True)
        self._thread.start()

    # --- any thread --------------------------------------------------------------------------------
    def send(self, endpoint: str, header: TransferHeader, tensors: Mapping[str, torch.Tensor]) -> Future:
        """Queue one state for `endpoint` (tcp://HOST:PORT or ipc://PATH); returns a Future[Ack].

        Raises ValueError at once when the tensors do not match the header (names, dtypes, shapes) or are
        not contiguous CPU tensors; every failure after that arrives through the future.
        """
        if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH")
        payload = _payload(header, tensors)
        if header.frame_bytes != self.max_frame_bytes:
            header = header.reframed(self.max_frame_bytes)
        future: Future = Future()
        future.set_running_or_notify_cancel()
        job = _Job(endpoint, header, payload, future, time.monotonic() + self.ack_timeout_s)
        with self._lock:
            if self._closed.is_set():
                future.set_exception(TransferError(f"transfer {header.transfer_id}: the sender is closed"))
                return future
            self._jobs.put(job)
            os.write(self._wake_w, b"j")
        return future

    def close(self) -> None:
        """Fail what is still in flight, close every socket with linger=0, stop the thread (idempotent)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._closed.set()
            self._jobs.put(None)
            os.write(self._wake_w, b"c")
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.error("transfer sender thread did not stop within 10 s; leaving its sockets")
            return
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> TransferSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the sender's thread -------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        running = True
        try:
            while running:
                try:
                    for sock, _ in poller.poll(self._poll_timeout_ms()):
                        if sock == self._wake_r:
                            os.read(self._wake_r, 4096)
                            running = self._take_jobs(poller)
                        elif isinstance(sock, zmq.Socket):
                            self._readable(sock)
                    self._send_due(poller)
                    self._expire(poller)
                except Exception:  # noqa: BLE001 - a bug on one transfer must not stop the others
                    log.exception("transfer sender: unexpected error (the thread goes on)")
        finally:
            with self._lock:
                self._closed.set()  # later sends fail at once instead of waiting on a dead thread
            self._shutdown(poller)

    def _poll_timeout_ms(self) -> int:
        times = [j.deadline for j in self._pending.values()] + [t for t, _, _ in self._delayed[:1]]
        if not times:
            return 1000
        return max(0, min(1000, int((min(times) - time.monotonic()) * 1000) + 1))

    def _take_jobs(self, poller: zmq.Poller) -> bool:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self._start(job, poller)

    def _start(self, job: _Job, poller: zmq.Poller) -> None:
        tid = job.header.transfer_id
        if tid in self._pending:
            _settle(job.future, error=TransferError(f"transfer {tid} is already in flight"))
            return
        self._pending[tid] = job
        fault = self._take_fault()
        if fault is not None and fault.kind == "drop":
            job.note = " (fault injection dropped the message)"
            return
        if fault is not None and fault.kind == "delay":
            job.note = f" (fault injection delayed the message {fault.delay_s}s)"
            heapq.heappush(self._delayed, (time.monotonic() + fault.delay_s, next(self._seq), job))
            return
        try:
            self._transmit(job, poller, fault)
        except Exception as exc:  # noqa: BLE001 - fail this transfer with the cause, keep the thread
            log.exception("transfer %s: could not be sent", tid)
            self._fail(tid, TransferError(f"transfer {tid} to {job.endpoint}: could not be sent: {exc}"))

    def _take_fault(self) -> FaultPlan | None:
        if self.fault is None or self._faults_left == 0:
            return None
        if self._faults_left is not None:
            self._faults_left -= 1
        return self.fault

    def _transmit(self, job: _Job, poller: zmq.Poller, fault: FaultPlan | None = None) -> None:
        header, tid = job.header, job.header.transfer_id
        if self.checksum is not None:
            header = header.with_checksums(self.checksum, [checksum(self.checksum, view) for view in job.payload])
        encoded = header.encode()
        frames: list = [encoded, header_tag(self.auth_key, encoded)]
        for view, t in zip(job.payload, header.tensors, strict=True):
            step = header.frame_bytes
            frames += [view[i * step: (i + 1) * step] for i in range(t.num_frames)]
        if fault is not None and fault.kind in ("truncate", "corrupt"):
            frames = _damage(frames, fault.kind)
            job.note = f" (fault injection: {fault.kind})"
        peer = self._peer(job.endpoint, poller)
        try:
            peer.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._fail(tid, TransferError(f"transfer {tid} to {job.endpoint}: the outgoing queue is full "
                                          f"({len(peer.sent)} transfers unanswered)"))
            return
        except zmq.ZMQError as exc:
            self._fail(tid, TransferError(f"transfer {tid} to {job.endpoint}: send failed: {exc}"))
            return
        peer.sent.append(tid)

    def _peer(self, endpoint: str, poller: zmq.Poller) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            monitor = sock.get_monitor_socket(_MONITOR_MASK)
            sock.connect(endpoint)
            peer = self._peers[endpoint] = _Peer(sock, monitor)
            self._by_socket[sock] = self._by_socket[monitor] = endpoint
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
        return peer

    def _readable(self, sock: zmq.Socket) -> None:
        endpoint = self._by_socket.get(sock)
        if endpoint is None:
            return
        peer = self._peers[endpoint]
        if sock is peer.monitor:
            while peer.monitor.poll(0):
                event = recv_monitor_message(peer.monitor)["event"]
                peer.state = _MONITOR_EVENTS.get(event, peer.state)
                peer.ever_connected |= event == zmq.EVENT_CONNECTED
        else:
            while peer.socket.poll(0):
                self._on_ack(endpoint, peer, peer.socket.recv_multipart())

    def _on_ack(self, endpoint: str, peer: _Peer, frames: list[bytes]) -> None:
        try:
            if len(frames) != 1:
                raise TransferError(f"expected one frame, got {len(frames)}")
            ack = Ack.decode(frames[0])
        except TransferError as exc:
            log.warning("unreadable ack from %s ignored: %s", endpoint, exc.reason)
            return
        tid = ack.transfer_id
        if tid == "" and peer.sent:  # the receiver could not read the header: answers come in send order
            tid = peer.sent[0]
            ack = Ack.reject(tid, ack.reason)
        job = self._pending.get(tid)
        if job is None or job.endpoint != endpoint:
            log.info("late or unknown ack for transfer %r from %s ignored (ok=%s)", tid, endpoint, ack.ok)
            return
        del self._pending[tid]
        _discard(peer.sent, tid)
        _settle(job.future, result=ack)

    def _send_due(self, poller: zmq.Poller) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job = heapq.heappop(self._delayed)
            if self._pending.get(job.header.transfer_id) is job:
                self._transmit(job, poller)

    def _expire(self, poller: zmq.Poller) -> None:
        now = time.monotonic()
        for tid, job in [(t, j) for t, j in self._pending.items() if j.deadline <= now]:
            peer = self._peers.get(job.endpoint)
            if peer is not None and peer.ever_connected:
                why = f"connected ({peer.state}) but no ack: the receiver is slow, or the message or its ack was lost"
            else:
                state = peer.state if peer is not None else "not contacted"
                why = f"the endpoint never accepted a connection ({state}): unreachable or nothing listening"
            self._fail(tid, TransferTimeout(f"transfer {tid} to {job.endpoint}: no ack within "
                                            f"{self.ack_timeout_s:g}s; {why}{job.note}"))
            if peer is not None and not peer.sent and peer.state != "connected":
                self._drop_peer(job.endpoint, poller)  # discard frames queued for a dead endpoint

    def _fail(self, tid: str, error: TransferError) -> None:
        job = self._pending.pop(tid, None)
        if job is None:
            return
        peer = self._peers.get(job.endpoint)
        if peer is not None:
            _discard(peer.sent, tid)
        log.warning("%s", error.reason, extra={"request_id": job.header.request_id})
        _settle(job.future, error=error)

    def _drop_peer(self, endpoint: str, poller: zmq.Poller) -> None:
        peer = self._peers.pop(endpoint)
        for sock in (peer.socket, peer.monitor):
            poller.unregister(sock)
            del self._by_socket[sock]
        peer.socket.disable_monitor()
        peer.monitor.close(linger=0)
        peer.socket.close(linger=0)

    def _shutdown(self, poller: zmq.Poller) -> None:
        for tid in list(self._pending):
            self._fail(tid, TransferError(f"transfer {tid}: the sender closed before the ack"))
        while True:  # jobs queued after the thread stopped reading
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _settle(job.future, error=TransferError(f"transfer {job.header.transfer_id}: the sender is closed"))
        for endpoint in list(self._peers):
            self._drop_peer(endpoint, poller)


def _payload(header: TransferHeader, tensors: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """Byte views of the tensors in header order (no copy), after checking them against the header."""
    names = [t.name for t in header.tensors]
    if set(names) != set(tensors):
        raise ValueError(f"transfer {header.transfer_id}: tensors {sorted(set(tensors) - set(names))} are not in "
                         f"the header; header tensors {sorted(set(names) - set(tensors))} are missing")
    views = []
    for spec in header.tensors:
        t = tensors[spec.name]
        dtype = _DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
        if dtype != spec.dtype or t.shape != spec.shape:
            raise ValueError(f"tensor {spec.name}: header says {spec.dtype} {spec.shape}, got {dtype} {tuple(t.shape)}")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {spec.name}: expected a contiguous CPU tensor, got device={t.device}, "
                             f"contiguous={t.is_contiguous()}")
        views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the tensor's own bytes, no copy
    return views


def _damage(frames: list, kind: str) -> list:
    """Fault injection: cut the last payload frame in half, or flip a byte of the first non-empty one."""
    frames = list(frames)
    if kind == "truncate":
        frames[-1] = bytes(frames[-1][: len(frames[-1]) // 2])
        return frames
    for i in range(2, len(frames)):  # after the header and its tag
        if len(frames[i]):
            damaged = bytearray(frames[i])
            damaged[len(damaged) // 2] ^= 0xFF
            frames[i] = bytes(damaged)
            return frames
    return frames


def _discard(sent: deque[str], tid: str) -> None:
    try:
        sent.remove(tid)
    except ValueError:
        pass


def _settle(future: Future, result: Ack | None = None, error: BaseException | None = None) -> None:
    """Resolve a future exactly once (a second outcome, or one after the caller cancelled, is dropped)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
