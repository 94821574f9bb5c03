"""P→D state transfer over real zmq sockets on 127.0.0.1 and ipc:// (docs/DESIGN.md §5, §10 invariant 3).

A real state exported by one engine arrives bit for bit in another, which then decodes the same tokens
as if it had never moved; many transfers fly at once; large tensors split into frames; every bad
transfer is rejected with its reason, leaves the receiver unchanged and keeps the thread alive; faults
(unreachable endpoint, dropped message, lost ack, slow receiver) end in timeouts with clear reasons.
"""

from __future__ import annotations

import queue
import random
import re
import threading
import time

import msgpack
import pytest
import torch
import zmq

from sparsepd.cluster_token import derive_key
from sparsepd.decode_worker.transfer_receiver import TransferReceiver
from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import StateDescriptor, TensorSpec, expected_specs, export_state, import_state
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset
from sparsepd.prefill_worker.transfer_sender import TransferSender
from sparsepd.proto import transfer as tp
from sparsepd.proto.transfer import (
    Ack,
    FaultPlan,
    TransferError,
    TransferHeader,
    TransferTimeout,
    checksum,
    header_tag,
    model_fingerprint,
    preferred_checksum,
)

FP = "0123456789abcdef"
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


# --- a synthetic state whose layout depends on num_pages, like the engine's ---------------------------
def specs_for(num_pages: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec(name="layers.0.swa", dtype="bfloat16", shape=(16, 64)),
            TensorSpec(name="layers.1.kv_compressed", dtype="bfloat16", shape=(num_pages, 32, 64)),
            TensorSpec(name="layers.1.index_cache", dtype="uint8", shape=(num_pages, 32, 144)),
            TensorSpec(name="layers.1.compressor.score", dtype="float32", shape=(8, 128)),
            TensorSpec(name="layers.2.positions", dtype="int64", shape=(3,)))


def make_state(seed: int, num_pages: int = 2, transfer_id: str | None = None, request_id: str | None = None,
               fingerprint: str = FP) -> tuple[TransferHeader, dict[str, torch.Tensor]]:
    """Random bit patterns in every tensor (NaNs and infinities included): equality is checked on bytes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in specs_for(num_pages):
        dtype = getattr(torch, spec.dtype)
        nbytes = torch.Size(spec.shape).numel() * dtype.itemsize
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
        tensors[spec.name] = raw.view(dtype).view(spec.shape)
    descriptor = StateDescriptor(position=num_pages * 128 - 5, num_pages=num_pages, output_ids=(seed % 97,),
                                 sampler_state=bytes([seed % 256]) * 40, tensors=specs_for(num_pages))
    header = TransferHeader.from_descriptor(descriptor, transfer_id=transfer_id or f"t{seed}",
                                            request_id=request_id or f"r{seed}", fingerprint=fingerprint)
    return header, tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


# --- fixtures: every socket and thread is closed at teardown -------------------------------------------
@pytest.fixture(autouse=True)
def no_thread_left():
    """After each test (and its fixtures' teardown), no sender or receiver thread is still running."""
    yield
    left = [t.name for t in threading.enumerate() if t.name in ("transfer-sender", "transfer-receiver")]
    assert not left, f"threads still running after close(): {left}"


class Inbox:
    """on_state / on_expire callbacks that record what the receiver handed over."""

    def __init__(self, delay_s: float = 0.0):
        self.states: queue.Queue = queue.Queue()
        self.expired: list[tuple[str, str]] = []
        self.delay_s = delay_s

    def on_state(self, transfer_id, descriptor, tensors):
        time.sleep(self.delay_s)
        self.states.put((transfer_id, descriptor, tensors))

    def on_expire(self, transfer_id, request_id):
        self.expired.append((transfer_id, request_id))

    def take(self, timeout_s: float = 5.0):
        return self.states.get(timeout=timeout_s)


@pytest.fixture
def make_receiver():
    made = []

    def make(endpoint="tcp://127.0.0.1:0", fingerprint=FP, inbox=None, **kw):
        inbox = inbox or Inbox()
        receiver = TransferReceiver(endpoint, fingerprint, inbox.on_state, on_expire=inbox.on_expire, **kw)
        made.append(receiver)
        return receiver, inbox

    yield make
    for r in made:
        r.close()


@pytest.fixture
def make_sender():
    made = []

    def make(**kw):
        kw.setdefault("ack_timeout_s", 5.0)
        sender = TransferSender(**kw)
        made.append(sender)
        return sender

    yield make
    for s in made:
        s.close()


def raw_exchange(endpoint: str, frames: list[bytes], timeout_s: float = 5.0) -> Ack:
    """Send hand-made frames from a bare DEALER and return the decoded answer."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(int(timeout_s * 1000)), "no answer from the receiver"
        return Ack.decode(sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()


def expect(receiver, header, deadline_s=5.0, **kw):
    receiver.expect(header.transfer_id, header.request_id, specs_for, deadline_s, **kw)


# --- a real engine state, P → D --------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported():
    """A 70-token prompt prefilled by a source engine (first token sampled), its state exported."""
    model = build_model(get_preset("tiny"), seed=0)
    prompt = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    want = generate(model, prompt, GREEDY).output_ids
    source = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=96, num_pages=16))
    request = source.submit(prompt, GREEDY)
    while not request.output_ids:
        source.step()
    descriptor, tensors = export_state(source.pools, request)
    source.abort(request.request_id)
    assert source.is_idle_and_empty()
    return model, prompt, want, descriptor, tensors


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_engine_state_arrives_bit_for_bit_and_decoding_continues(exported, transport, tmp_path, make_receiver,
                                                                 make_sender):
    model, prompt, want, descriptor, tensors = exported
    fingerprint = model_fingerprint(model.cfg)
    target = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=96, num_pages=24))
    moved = target.make_request(prompt, GREEDY, request_id="req-moved")
    target.scheduler.reserve(moved)
    endpoint = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp_path}/decode.sock"
    receiver, inbox = make_receiver(endpoint, fingerprint)
    receiver.expect("xfer-1", "req-moved", lambda n: expected_specs(target.pools, n), 5.0, max_pages=len(moved.pages))
    header = TransferHeader.from_descriptor(descriptor, transfer_id="xfer-1", request_id="req-moved",
                                            fingerprint=fingerprint)
    sender = make_sender(max_frame_bytes=4096)  # every page tensor splits into several frames
    ack = sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    assert ack == Ack(transfer_id="xfer-1", ok=True, reason="")
    tid, got_descriptor, got = inbox.take()
    assert tid == "xfer-1" and got_descriptor == descriptor
    assert set(got) == set(tensors)
    bad = [name for name in tensors if not same_bytes(got[name], tensors[name])]
    assert not bad, f"tensors differ after the trip: {bad}"
    assert max(t.num_frames for t in header.reframed(4096).tensors) > 1
    import_state(target.pools, moved, got_descriptor, got)
    target.scheduler.activate(moved)
    target.scheduler.run_to_completion()
    assert moved.output_ids == want
    assert target.is_idle_and_empty()
    assert receiver.num_tickets == 0 and receiver.stats["accepted"] == 1


def test_many_transfers_in_flight_from_two_senders_to_two_receivers(make_receiver, make_sender, tmp_path):
    receivers = [make_receiver()[0:2], make_receiver(f"ipc://{tmp_path}/d2.sock")[0:2]]
    senders = [make_sender(max_frame_bytes=1024), make_sender()]
    sent, futures = {}, []
    for i in range(32):
        receiver, _ = receivers[i % 2]
        header, tensors = make_state(i, num_pages=1 + i % 3)
        expect(receiver, header)
        sent[header.transfer_id] = tensors
        futures.append(senders[(i // 2) % 2].send(receiver.endpoint, header, tensors))
    acks = [f.result(timeout=10) for f in futures]
    assert [a.ok for a in acks] == [True] * 32, [a.reason for a in acks if not a.ok]
    assert sorted(a.transfer_id for a in acks) == sorted(sent)
    received = {}
    for _, inbox in receivers:
        while not inbox.states.empty():
            tid, _, tensors = inbox.take()
            received[tid] = tensors
    assert sorted(received) == sorted(sent)
    for tid, tensors in sent.items():
        assert all(same_bytes(received[tid][n], t) for n, t in tensors.items()), tid


def test_large_tensors_travel_as_bounded_frames(make_sender):
    """A bare ROUTER sees the header, its tag (empty: no key) and ⌈nbytes/frame_bytes⌉ frames per tensor, none
    above the bound."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    try:
        endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        header, tensors = make_state(1, num_pages=3)
        future = make_sender(max_frame_bytes=1000, checksum=False).send(endpoint, header, tensors)
        assert router.poll(5000)
        identity, head, tag, *payload = router.recv_multipart()
        wire = TransferHeader.decode(head)
        assert tag == b""
        assert wire.frame_bytes == 1000 and wire.checksum_algorithm is None
        assert [t.checksum for t in wire.tensors] == [None] * 5
        want = [min(1000, t.nbytes - k * 1000) for t in wire.tensors for k in range(t.num_frames)]
        assert [len(f) for f in payload] == want and max(want) == 1000 and len(payload) > 5
        assert b"".join(payload) == b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes()
                                            for t in tensors.values())
        router.send_multipart([identity, Ack(transfer_id=header.transfer_id, ok=True).encode()])
        assert future.result(timeout=5).ok
    finally:
        router.close(linger=0)
        ctx.term()


# --- rejections: a reason, nothing handed over, the ticket kept, the thread alive ---------------------
def _assert_unchanged(receiver, inbox, tickets: int):
    assert inbox.states.empty()
    assert receiver.num_tickets == tickets
    assert receiver.stats["accepted"] == 0


@pytest.mark.parametrize("case, reason", [
    ("unknown", "unknown transfer id"),
    ("fingerprint", "model fingerprint fedcba9876543210 does not match"),
    ("request", "belongs to request 'r3', the header names 'someone-else'"),
    ("shape", r"tensor layers.1.kv_compressed: the header says bfloat16 \(2, 32, 64\), the reservation expects "
              r"bfloat16 \(2, 32, 32\)"),
    ("names", r"missing \['layers.9.extra'\]"),
    ("pages", "the state has 2 pages, the reservation holds 1"),
])
def test_rejections_through_the_sender(case, reason, make_receiver, make_sender):
    receiver, inbox = make_receiver()
    header, tensors = make_state(3, num_pages=2)
    if case == "fingerprint":
        header, tensors = make_state(3, num_pages=2, fingerprint="fedcba9876543210")
    if case == "request":
        header, tensors = make_state(3, num_pages=2, request_id="someone-else")
    specs = specs_for
    if case == "shape":
        specs = lambda n: [s if s.name != "layers.1.kv_compressed" else s.model_copy(update={"shape": (n, 32, 32)})
                           for s in specs_for(n)]
    if case == "names":
        specs = lambda n: [*specs_for(n), TensorSpec(name="layers.9.extra", dtype="uint8", shape=(1,))]
    if case != "unknown":
        receiver.expect("t3", "r3", specs, 5.0, max_pages=1 if case == "pages" else None)
    ack = make_sender().send(receiver.endpoint, header, tensors).result(timeout=5)
    assert not ack.ok and ack.transfer_id == header.transfer_id
    assert ack.reason and re.search(reason, ack.reason), ack.reason
    _assert_unchanged(receiver, inbox, tickets=0 if case == "unknown" else 1)
    assert receiver.stats["rejected"] == 1


def test_expired_reservation_is_dropped_reported_and_rejected(make_receiver, make_sender):
    receiver, inbox = make_receiver()
    header, tensors = make_state(4)
    expect(receiver, header, deadline_s=0.05)
    deadline = time.monotonic() + 3
    while not inbox.expired and time.monotonic() < deadline:  # the receiver's own sweep reports it
        time.sleep(0.01)
    assert inbox.expired == [("t4", "r4")]
    ack = make_sender().send(receiver.endpoint, header, tensors).result(timeout=5)
    assert not ack.ok and ack.reason == "transfer t4: the reservation expired"
    _assert_unchanged(receiver, inbox, tickets=0)
    assert inbox.expired == [("t4", "r4")]  # reported once


def test_expired_at_arrival_is_rejected_and_reported_once(make_receiver, make_sender):
    receiver, inbox = make_receiver()
    header, tensors = make_state(5)
    sender = make_sender(fault=FaultPlan("delay", 0.3))
    expect(receiver, header, deadline_s=0.25)
    ack = sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    assert not ack.ok and "the reservation expired" in ack.reason
    assert inbox.expired == [("t5", "r5")]
    _assert_unchanged(receiver, inbox, tickets=0)


def test_duplicates_and_cancelled_tickets_are_rejected(make_receiver, make_sender):
    receiver, inbox = make_receiver()
    sender = make_sender()
    header, tensors = make_state(6)
    expect(receiver, header)
    assert sender.send(receiver.endpoint, header, tensors).result(timeout=5).ok
    again = sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    assert not again.ok and again.reason == "transfer t6: already received"
    assert inbox.states.qsize() == 1
    other, other_tensors = make_state(7)
    expect(receiver, other)
    assert receiver.cancel("t7") and not receiver.cancel("t7")
    ack = sender.send(receiver.endpoint, other, other_tensors).result(timeout=5)
    assert not ack.ok and ack.reason == "transfer t7: the reservation was cancelled"
    with pytest.raises(ValueError, match="already used"):
        expect(receiver, other)
    assert inbox.states.qsize() == 1 and receiver.stats["accepted"] == 1


def _frames(header: TransferHeader, tensors, key: bytes | None = None) -> list[bytes]:
    encoded = header.encode()
    return [encoded, header_tag(key, encoded),
            *(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())]


@pytest.mark.parametrize("case, reason, tid", [
    ("garbage", "transfer header: malformed msgpack", ""),
    ("not-a-map", "expected a msgpack map", ""),
    ("version", "protocol version 2 is not supported; this side speaks 3", "t8"),
    ("missing-frame", "expected 5 payload frames, got 4", "t8"),
    ("extra-frame", "expected 5 payload frames, got 6", "t8"),
    ("short-frame", "tensor layers.1.index_cache frame 0: 9215 bytes, expected 9216", "t8"),
    ("long-frame", "tensor layers.0.swa frame 0: 2049 bytes, expected 2048", "t8"),
])
def test_malformed_messages_are_rejected_and_the_receiver_goes_on(case, reason, tid, make_receiver, make_sender):
    receiver, inbox = make_receiver()
    header, tensors = make_state(8)
    expect(receiver, header)
    frames = _frames(header, tensors)
    if case == "garbage":
        frames = [b"\xc1\xc1 not msgpack", b"x"]
    elif case == "not-a-map":
        frames = [msgpack.packb([1, 2]), *frames[1:]]
    elif case == "version":
        raw = msgpack.unpackb(frames[0])
        frames[0] = msgpack.packb({**raw, "version": 2})
    elif case == "missing-frame":
        frames = frames[:-1]
    elif case == "extra-frame":
        frames = [*frames, b""]
    elif case == "short-frame":
        frames[4] = frames[4][:-1]
    elif case == "long-frame":
        frames[2] = frames[2] + b"\x00"
    ack = raw_exchange(receiver.endpoint, frames)
    assert ack == Ack(transfer_id=tid, ok=False, reason=ack.reason) and reason in ack.reason, ack.reason
    _assert_unchanged(receiver, inbox, tickets=1)
    assert make_sender().send(receiver.endpoint, header, tensors).result(timeout=5).ok  # the retry succeeds
    assert same_bytes(inbox.take()[2]["layers.1.index_cache"], tensors["layers.1.index_cache"])


def test_only_a_peer_with_the_deployment_key_can_push_a_state(make_receiver, make_sender):
    """A push that a valid ticket would admit but whose tag is missing, forged, made with another key, or whose
    header was altered after tagging: rejected as unauthenticated and counted, nothing written, the ticket
    still open for the real sender."""
    key = derive_key("the-deployment-token-0123456789", "transfer")
    receiver, inbox = make_receiver(auth_key=key)
    header, tensors = make_state(15)
    expect(receiver, header)
    good = _frames(header, tensors, key)
    forged = [good[0], bytes(32), *good[2:]]
    tampered = [msgpack.packb({**msgpack.unpackb(good[0]), "position": header.position + 1}), *good[1:]]
    reasons = [make_sender().send(receiver.endpoint, header, tensors).result(timeout=5).reason,
               make_sender(auth_key=derive_key("another-deployment-0123456789", "transfer")).send(
                   receiver.endpoint, header, tensors).result(timeout=5).reason,
               raw_exchange(receiver.endpoint, forged).reason, raw_exchange(receiver.endpoint, tampered).reason]
    assert reasons[0] == "unauthenticated: the message carries no tag (the sender has no deployment secret)"
    assert reasons[1:] == ["unauthenticated: the header's tag does not verify under this deployment's secret"] * 3
    _assert_unchanged(receiver, inbox, tickets=1)
    assert receiver.stats["unauthenticated"] == 4 and receiver.stats["rejected"] == 4
    assert make_sender(auth_key=key).send(receiver.endpoint, header, tensors).result(timeout=5).ok
    assert same_bytes(inbox.take()[2]["layers.0.swa"], tensors["layers.0.swa"])


@pytest.mark.parametrize("fault, reason", [
    ("truncate", r"tensor layers.2.positions frame 0: 12 bytes, expected 24 \(truncated or corrupted\)"),
    ("corrupt", rf"tensor layers.0.swa: {preferred_checksum()} [0-9a-f]{{8}} != header [0-9a-f]{{8}} \(corrupted\)"),
])
def test_injected_frame_faults_are_caught(fault, reason, make_receiver, make_sender):
    receiver, inbox = make_receiver(require_checksum=True)
    header, tensors = make_state(9)
    before = {n: t.clone() for n, t in tensors.items()}
    expect(receiver, header)
    sender = make_sender(fault=FaultPlan(fault, limit=1))
    ack = sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    assert not ack.ok and re.fullmatch(reason, ack.reason), ack.reason
    assert all(same_bytes(tensors[n], before[n]) for n in tensors)  # the fault never touches the caller's data
    _assert_unchanged(receiver, inbox, tickets=1)
    assert sender.send(receiver.endpoint, header, tensors).result(timeout=5).ok  # limit=1: the retry is clean


def test_unchecksummed_state_is_refused_when_checksums_are_required(make_receiver, make_sender):
    receiver, inbox = make_receiver(require_checksum=True)
    header, tensors = make_state(10)
    expect(receiver, header)
    ack = make_sender(checksum=False).send(receiver.endpoint, header, tensors).result(timeout=5)
    assert not ack.ok and ack.reason == "the state carries no checksum and this receiver requires one"
    _assert_unchanged(receiver, inbox, tickets=1)


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32c-numpy", "crc32"])
def test_a_flipped_byte_in_any_frame_is_refused_by_its_checksum(algorithm, make_receiver, monkeypatch):
    """Every payload frame, tensors cut into several: one flipped byte → that tensor's checksum reason."""
    if algorithm == "crc32c-numpy":  # the receiver without the hardware package verifies with the fallback
        monkeypatch.setattr(tp, "_crc32c_package", None)
    name = algorithm.removesuffix("-numpy")
    receiver, inbox = make_receiver(require_checksum=True)
    header, tensors = make_state(14, num_pages=2)
    expect(receiver, header)
    payload = [t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values()]
    wire = header.reframed(4096).with_checksums(name, [checksum(name, b) for b in payload])
    frames, owners = [wire.encode(), b""], []
    for t, data in zip(wire.tensors, payload, strict=True):
        frames += [data[k * 4096: (k + 1) * 4096] for k in range(t.num_frames)]
        owners += [t.name] * t.num_frames
    assert len(frames) - 2 == 8 and max(t.num_frames for t in wire.tensors) == 3
    rng = random.Random(14)
    for i, owner in enumerate(owners, start=2):
        damaged = bytearray(frames[i])
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        ack = raw_exchange(receiver.endpoint, [*frames[:i], bytes(damaged), *frames[i + 1:]])
        want = rf"tensor {re.escape(owner)}: {name} [0-9a-f]{{8}} != header [0-9a-f]{{8}} \(corrupted\)"
        assert not ack.ok and re.fullmatch(want, ack.reason), (i, ack.reason)
    _assert_unchanged(receiver, inbox, tickets=1)
    assert raw_exchange(receiver.endpoint, frames).ok  # the intact message is still welcome
    got = inbox.take()[2]
    assert all(same_bytes(got[n], t) for n, t in tensors.items())


def test_sender_algorithm_choice(make_sender, monkeypatch):
    assert make_sender().checksum == preferred_checksum()
    assert make_sender(checksum="crc32").checksum == "crc32" and make_sender(checksum=False).checksum is None
    with pytest.raises(ValueError, match="checksum='md5'"):
        make_sender(checksum="md5")
    monkeypatch.setattr(tp, "_crc32c_package", None)  # without the hardware package zlib's crc32 is faster
    assert make_sender().checksum == "crc32"


def test_on_state_refusal_becomes_a_rejection(make_receiver, make_sender):
    def refuse(transfer_id, descriptor, tensors):
        raise RuntimeError("no slot any more")

    receiver = TransferReceiver("tcp://127.0.0.1:0", FP, refuse)
    try:
        header, tensors = make_state(11)
        expect(receiver, header)
        ack = make_sender().send(receiver.endpoint, header, tensors).result(timeout=5)
        assert not ack.ok and ack.reason == "the decode worker refused the state: no slot any more"
        ack = make_sender().send(receiver.endpoint, header, tensors).result(timeout=5)
        assert ack.reason == "transfer t11: the decode worker refused the state: no slot any more"
    finally:
        receiver.close()


# --- faults: timeouts with reasons, no crash, nothing delivered twice ------------------------------
def test_unreachable_endpoint_times_out_with_a_clear_reason(make_sender, tmp_path):
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    ctx.term()
    sender = make_sender(ack_timeout_s=0.3)
    header, tensors = make_state(12)
    for endpoint in (f"tcp://127.0.0.1:{port}", f"ipc://{tmp_path}/nobody.sock"):
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="no ack within 0.3s; the endpoint never accepted a connection"):
            sender.send(endpoint, header, tensors).result(timeout=5)
        assert 0.25 < time.monotonic() - start < 3


def test_dropped_message_times_out_and_leaves_the_receiver_unchanged(make_receiver, make_sender):
    receiver, inbox = make_receiver()
    header, tensors = make_state(13)
    expect(receiver, header)
    sender = make_sender(ack_timeout_s=0.3, fault=FaultPlan("drop"))
    with pytest.raises(TransferTimeout, match=r"no ack within 0.3s.*\(fault injection dropped the message\)"):
        sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    _assert_unchanged(receiver, inbox, tickets=1)
    assert receiver.stats["rejected"] == 0


def test_lost_ack_times_out_and_a_resend_is_not_delivered_twice(make_receiver, make_sender):
    receiver, inbox = make_receiver(fault=FaultPlan("drop_ack", limit=1))
    header, tensors = make_state(14)
    expect(receiver, header)
    sender = make_sender(ack_timeout_s=0.3)
    with pytest.raises(TransferTimeout, match="connected .* but no ack"):
        sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    assert inbox.take()[0] == "t14"  # the receiver did take it
    ack = sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    assert not ack.ok and ack.reason == "transfer t14: already received"
    assert inbox.states.empty() and receiver.stats["accepted"] == 1


def test_slow_receiver_times_out_and_its_late_ack_is_ignored(make_receiver, make_sender):
    receiver, inbox = make_receiver(inbox=Inbox(delay_s=0.5))
    slow, slow_tensors = make_state(15)
    expect(receiver, slow)
    sender = make_sender(ack_timeout_s=0.2)
    future = sender.send(receiver.endpoint, slow, slow_tensors)
    with pytest.raises(TransferTimeout, match="receiver is slow"):
        future.result(timeout=5)
    inbox.take()  # delivered after the sender gave up; its ack arrives late and changes nothing
    time.sleep(0.1)
    assert isinstance(future.exception(), TransferTimeout)
    quick = make_sender()  # the next transfer on a fresh sender goes through
    header, tensors = make_state(16)
    expect(receiver, header)
    assert quick.send(receiver.endpoint, header, tensors).result(timeout=5).ok


def test_delayed_message_still_arrives(make_receiver, make_sender):
    receiver, inbox = make_receiver()
    header, tensors = make_state(17)
    expect(receiver, header)
    start = time.monotonic()
    ack = make_sender(fault=FaultPlan("delay", 0.2)).send(receiver.endpoint, header, tensors).result(timeout=5)
    assert ack.ok and time.monotonic() - start >= 0.2
    assert inbox.take()[0] == "t17"


def test_env_var_turns_on_a_fault(make_receiver, make_sender, monkeypatch):
    monkeypatch.setenv("SPARSEPD_TRANSFER_FAULT", "drop@1")
    receiver, inbox = make_receiver()
    sender = make_sender(ack_timeout_s=0.3)
    assert sender.fault == FaultPlan("drop", limit=1) and receiver.fault is None  # a sender kind
    header, tensors = make_state(18)
    expect(receiver, header)
    with pytest.raises(TransferTimeout, match="fault injection dropped"):
        sender.send(receiver.endpoint, header, tensors).result(timeout=5)
    assert sender.send(receiver.endpoint, header, tensors).result(timeout=5).ok


def test_close_fails_what_is_in_flight(make_receiver):
    receiver, inbox = make_receiver(inbox=Inbox(delay_s=0.3))
    header, tensors = make_state(19)
    expect(receiver, header)
    sender = TransferSender(ack_timeout_s=5)
    future = sender.send(receiver.endpoint, header, tensors)
    time.sleep(0.05)
    sender.close()
    with pytest.raises(TransferError, match="the sender closed before the ack"):
        future.result(timeout=1)
    with pytest.raises(TransferError, match="the sender is closed"):
        sender.send(receiver.endpoint, header, tensors).result(timeout=1)
    sender.close()  # idempotent


def test_bad_arguments_raise_at_once(make_sender, make_receiver):
    sender = make_sender()
    header, tensors = make_state(20)
    with pytest.raises(ValueError, match="tcp://HOST:PORT or ipc://PATH"):
        sender.send("http://x", header, tensors)
    with pytest.raises(ValueError, match=r"header tensors \['layers.0.swa'\] are missing"):
        sender.send("tcp://127.0.0.1:1", header, {k: v for k, v in tensors.items() if k != "layers.0.swa"})
    wrong = {**tensors, "layers.0.swa": tensors["layers.0.swa"].float()}
    with pytest.raises(ValueError, match=r"layers.0.swa: header says bfloat16 \(16, 64\), got float32 \(16, 64\)"):
        sender.send("tcp://127.0.0.1:1", header, wrong)
    strided = {**tensors, "layers.0.swa": tensors["layers.0.swa"].t().contiguous().t()}
    with pytest.raises(ValueError, match="expected a contiguous CPU tensor"):
        sender.send("tcp://127.0.0.1:1", header, strided)
    receiver, _ = make_receiver()
    with pytest.raises(OSError, match="cannot bind the transfer receiver"):
        TransferReceiver(receiver.endpoint, FP, lambda *a: None)
    with pytest.raises(ValueError, match="transfer_id"):
        receiver.expect("bad id", "r", specs_for)
    with pytest.raises(ValueError, match="deadline_s"):
        receiver.expect("t", "r", specs_for, 0.0)


def test_receiver_uses_its_expected_function_when_a_ticket_has_no_specs(make_sender):
    calls = []
    inbox = Inbox()

    def expected(transfer_id, num_pages):
        calls.append((transfer_id, num_pages))
        return specs_for(num_pages)

    receiver = TransferReceiver("tcp://127.0.0.1:0", FP, inbox.on_state, expected=expected)
    try:
        header, tensors = make_state(21, num_pages=3)
        receiver.expect("t21", "r21", deadline_s=5.0)
        assert make_sender().send(receiver.endpoint, header, tensors).result(timeout=5).ok
        assert calls == [("t21", 3)]
    finally:
        receiver.close()


def test_sender_matches_anonymous_and_ignores_unreadable_acks(make_sender):
    """A receiver that could not read a header answers with transfer id "": the oldest unanswered transfer
    on that connection gets the rejection; an unreadable ack changes nothing (that transfer times out)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    try:
        endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        sender = make_sender(ack_timeout_s=0.5)
        (h1, t1), (h2, t2), (h3, t3) = make_state(22), make_state(23), make_state(24)
        futures = [sender.send(endpoint, h, t) for h, t in ((h1, t1), (h2, t2), (h3, t3))]
        identities = []
        for _ in range(3):
            assert router.poll(5000)
            identities.append(router.recv_multipart()[0])
        router.send_multipart([identities[0], Ack.reject("", "transfer header: malformed msgpack").encode()])
        router.send_multipart([identities[1], b"\xc1 not an ack"])
        router.send_multipart([identities[2], Ack(transfer_id="t24", ok=True).encode()])
        assert futures[0].result(timeout=5) == Ack.reject("t22", "transfer header: malformed msgpack")
        assert futures[2].result(timeout=5).ok
        with pytest.raises(TransferTimeout, match="t23 .* connected"):
            futures[1].result(timeout=5)
    finally:
        router.close(linger=0)
        ctx.term()
