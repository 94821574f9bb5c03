"""Security through real processes on 127.0.0.1 (authentication on, as everywhere in the suite: the processes
inherit tests/conftest.py's cluster token):

- no request can fail another: a fuzz of sampling parameters batched with ordinary requests;
- registration without the token, with a wrong one, or with a wrong or empty model fingerprint is refused,
  and the would-be worker (a live gRPC server in this test, answering as a healthy worker) never gets a call;
- worker-control calls without the token, or with a wrong one, are UNAUTHENTICATED and change nothing;
- GetServerInfo and GetLoads show the workers' addresses only to a caller with the token;
- a zmq push of a state from a peer without the deployment's key, for a real ticket, is rejected and counted,
  and nothing is written;
- TLS (certificates made here with the openssl command): every gRPC port of the deployment speaks TLS only,
  the router dials its workers trusting the test CA; a client with the CA is served, a plaintext client and
  a client trusting another CA are not; mutual TLS refuses a client without a certificate."""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import WORKER_ARGS, collect, generate_request, run, start_router, stub_of, wait_all_free  # noqa: E402

from sparsepd.cluster_token import METADATA_KEY, AuthorizedStub, derive_key, token_from_env  # noqa: E402
from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402
from sparsepd.proto.transfer import TransferHeader, header_tag  # noqa: E402
from sparsepd.tls import TlsConfig, add_port  # noqa: E402

MAX_NEW = 3
VOCAB = get_preset("tiny").vocab_size
SUBNORMAL = 1e-45  # the smallest fp32 subnormal (the public proto's floats are fp32)
FP32_MAX = float(torch.finfo(torch.float32).max)
# Per field: (values the API accepts, extremes included; values it refuses). The public proto's floats are fp32.
FIELDS = {
    "temperature": ([0.0, -0.0, SUBNORMAL, 1e-38, 1e-30, 1e-7, 0.7, 1e30, FP32_MAX], [math.nan, math.inf, -math.inf]),
    "top_k": ([-1, 0, 1, 5, 2**31 - 1], [-2]),
    "top_p": ([SUBNORMAL, 1e-30, 0.5, 1.0], [math.nan, math.inf, -1.0, 0.0, 1.5]),
    "min_p": ([0.0, SUBNORMAL, 0.5, 0.999], [math.nan, math.inf, 1.0]),
    "min_new_tokens": ([0, 2, MAX_NEW], [MAX_NEW + 1]),
    "ignore_eos": ([False, True], []),
    "seed": ([0, 7, 2**63 - 1], [2**63, 2**64 - 1]),
}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, a certificate for 127.0.0.1 signed by it (server and client use), and an unrelated CA (EC P-256)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"), "-days", "2",
                 "-subj", f"/CN=sparsepd test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", *ec, "-keyout", str(d / "node.key"), "-out", str(d / "node.csr"), "-subj", "/CN=127.0.0.1")
    (d / "node.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", str(d / "node.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-out", str(d / "node.pem"), "-days", "2", "-extfile", str(d / "node.ext"))
    return {name: d / f"{name}.{ext}" for name, ext in (("ca", "pem"), ("other-ca", "pem"), ("node", "pem"))} | {
        "node_key": d / "node.key"}


@pytest.fixture(scope="module")
def deployment(certs):
    """Router and workers with TLS on every gRPC port; the router dials the workers trusting the test CA. The
    two workers start at once, and stop at once (2 cores: about twice as fast)."""
    tls = ["--tls-cert", str(certs["node"]), "--tls-key", str(certs["node_key"])]
    with ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(start, role, [f"{role}-worker", *WORKER_ARGS, *tls]) for role in ("decode", "prefill")]
    children = [w.result() for w in workers if w.exception() is None]
    try:
        if len(children) < 2:
            raise next(w.exception() for w in workers if w.exception() is not None)
        decode, prefill = children
        router = start_router(prefill.ready["grpc"], decode.ready["grpc"], "--batch-tokens", "512", *tls,
                              "--cluster-tls-ca", str(certs["ca"]))
        children.append(router)
        yield {"router": router.ready["grpc"], "decode": decode, "prefill": prefill, "router_child": router,
               "fingerprint": decode.ready["fingerprint"], "ca": certs["ca"].read_bytes(), "certs": certs}
    finally:
        if len(children) == 3:
            stop(children.pop())
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(stop, children))


def channel(address: str, ca: bytes) -> grpc.aio.Channel:
    """A TLS channel trusting `ca` (every port of the deployment speaks TLS only)."""
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))


def _fuzz_params(rng: random.Random) -> tuple[dict, str | None]:
    """Every field at a random accepted extreme; one field in three requests at a refused value instead (its
    name is returned)."""
    params = {name: rng.choice(ok) for name, (ok, _) in FIELDS.items()}
    bad = None
    if rng.random() < 0.33:
        bad = rng.choice([n for n, (_, refused) in FIELDS.items() if refused])
        params[bad] = rng.choice(FIELDS[bad][1])
    return params, bad


async def _outcome(stub, request) -> tuple[str, list[int], str]:
    try:
        done = None
        async for response in stub.Generate(request, timeout=120):
            if response.HasField("complete"):
                done = response.complete
        return done.finish_reason, list(done.output_ids), ""
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, [], exc.details()


def test_sampling_fuzz_never_fails_an_ordinary_request(deployment):
    rng = random.Random(2026)
    gen = torch.Generator().manual_seed(23)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 5, 16, 17, 33)]
    model = build_model(get_preset("tiny"), seed=0)  # the single-process reference, request by request
    want = [generate(model, p, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)).output_ids for p in prompts]
    fuzz = [_fuzz_params(rng) for _ in range(20)]
    plain = dict(top_k=-1, top_p=1.0, min_p=0.0, min_new_tokens=0, ignore_eos=True, seed=1)
    fuzz[:4] = [({**plain, "temperature": math.inf, "min_new_tokens": MAX_NEW, "ignore_eos": False}, "temperature"),
                ({**plain, "temperature": math.inf, "top_k": 5}, "temperature"),  # the reported cases
                ({**plain, "temperature": 1e-30}, None), ({**plain, "temperature": 1e30, "min_p": 0.5}, None)]

    async def main():
        async with channel(deployment["router"], deployment["ca"]) as ch:
            stub = stub_of(ch)
            requests = []
            for i in range(max(len(prompts), len(fuzz))):  # interleaved: every batch mixes both kinds
                if i < len(prompts):
                    requests.append(generate_request(prompts[i], MAX_NEW, request_id=f"ordinary-{i}"))
                if i < len(fuzz):
                    ids = pb.TokenizedInput(input_ids=prompts[i % len(prompts)])
                    sp = pb.SamplingParams(max_new_tokens=MAX_NEW, **fuzz[i][0])
                    requests.append(pb.GenerateRequest(request_id=f"fuzz-{i}", sampling_params=sp, tokenized=ids))
            outcomes = await asyncio.gather(*(_outcome(stub, r) for r in requests))
            await wait_all_free(stub)
            return {r.request_id: o for r, o in zip(requests, outcomes, strict=True)}

    got = run(main())
    assert [got[f"ordinary-{i}"] for i in range(len(prompts))] == [("length", w, "") for w in want]
    for i, (params, bad) in enumerate(fuzz):
        status, ids, details = got[f"fuzz-{i}"]
        if bad is None:
            assert status in ("stop", "length") and 1 <= len(ids) <= MAX_NEW and all(0 <= t < VOCAB for t in ids), \
                (i, params, status, ids, details)
        else:  # refused, naming the field
            assert status == "INVALID_ARGUMENT" and bad in details, (i, params, status, details)
    assert sum(bad is None for _, bad in fuzz) >= 10  # the fuzz reaches the workers, not only the validation
    assert [got[f"fuzz-{i}"][0] for i in (2, 3)] == ["length"] * 2


WRONG = (METADATA_KEY, "not-the-deployment-token-0123456789")


class _WouldBeWorker(worker_pb2_grpc.DecodeWorkerServicer):
    """A healthy-looking decode worker of the right model that counts every call it gets."""

    def __init__(self, fingerprint: str):
        self.fingerprint, self.calls = fingerprint, []

    async def Health(self, request, context):
        self.calls.append("Health")
        return worker_pb2.HealthResponse(serving=True, role="decode", fingerprint=self.fingerprint)

    async def Stats(self, request, context):
        self.calls.append("Stats")
        return worker_pb2.StatsResponse(role="decode", num_pages=1000, free_pages=1000, num_slots=64, free_slots=64)

    async def Reserve(self, request, context):
        self.calls.append("Reserve")
        await context.abort(grpc.StatusCode.INTERNAL, "a request was placed on a worker that never joined")


def test_registration_needs_the_token_and_the_routers_own_fingerprint(deployment):
    async def main():
        fake = _WouldBeWorker(deployment["fingerprint"])
        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(fake, server)
        certs = deployment["certs"]  # TLS as the router expects: only the token and the fingerprint keep it out
        port = add_port(server, "127.0.0.1:0", TlsConfig(cert_pem=certs["node"].read_bytes(),
                                                         key_pem=certs["node_key"].read_bytes()))
        await server.start()
        address = f"127.0.0.1:{port}"
        register = worker_pb2.RegisterRequest(role="decode", address=address, fingerprint=deployment["fingerprint"],
                                              num_pages=1000, num_slots=64, endpoint="tcp://127.0.0.1:1")
        codes, replies = [], []
        try:
            async with channel(deployment["router"], deployment["ca"]) as ch:
                registry = worker_pb2_grpc.WorkerRegistryStub(ch)
                for metadata in (None, (WRONG,)):  # no token, a wrong token
                    try:
                        await registry.Register(register, metadata=metadata, timeout=10)
                        codes.append("OK")
                    except grpc.aio.AioRpcError as exc:
                        codes.append((exc.code(), exc.details()))
                authorized = AuthorizedStub(registry, token_from_env())
                for fingerprint in ("0123456789abcdef", ""):  # the right token, another model or none
                    wrong = worker_pb2.RegisterRequest()
                    wrong.CopyFrom(register)
                    wrong.fingerprint = fingerprint
                    replies.append(await authorized.Register(wrong, timeout=10))
                stub = stub_of(ch)
                outcomes = await asyncio.gather(*(_outcome(stub, generate_request([5, 6, i], 3)) for i in range(6)))
                info = await stub.GetServerInfo(pb.GetServerInfoRequest())
                await asyncio.sleep(1.5)  # three poll rounds: a pool member would have been polled by now
        finally:
            await server.stop(None)
        return codes, replies, outcomes, info, fake.calls, address

    codes, replies, outcomes, info, calls, address = run(main())
    assert [c[0] for c in codes] == [grpc.StatusCode.UNAUTHENTICATED] * 2, codes
    assert "no cluster token" in codes[0][1] and "wrong cluster token" in codes[1][1], codes
    assert [r.accepted for r in replies] == [False, False], replies
    assert "model fingerprint 0123456789abcdef" in replies[0].message
    assert deployment["fingerprint"] in replies[0].message
    assert "no model fingerprint" in replies[1].message, replies[1].message
    assert all(o[0] == "length" and len(o[1]) == 3 for o in outcomes), outcomes
    assert calls == [], calls  # never polled, never given a request
    assert address not in [w["address"] for w in info.scheduler_info["workers"]]
    log = "\n".join(deployment["router_child"].log_tail)
    assert "refused /sparsepd.worker.WorkerRegistry/Register from ipv4:127.0.0.1:" in log, log[-2000:]
    assert f"refused the registration of decode worker {address} from ipv4:127.0.0.1:" in log, log[-2000:]


def test_worker_control_without_the_token_is_unauthenticated_and_changes_nothing(deployment):
    decode, prefill = deployment["decode"].ready, deployment["prefill"].ready

    async def main():
        async with channel(decode["grpc"], deployment["ca"]) as dch, channel(prefill["grpc"], deployment["ca"]) as pch:
            d, p = worker_pb2_grpc.DecodeWorkerStub(dch), worker_pb2_grpc.PrefillWorkerStub(pch)
            before = await AuthorizedStub(d, token_from_env()).Stats(worker_pb2.StatsRequest())
            reserve = worker_pb2.ReserveRequest(request_id="intruder", prompt_len=8,
                                                sampling=worker_pb2.SamplingParams(max_new_tokens=4))
            ticket = worker_pb2.Ticket(transfer_id="t", endpoint=decode["zmq"], fingerprint=deployment["fingerprint"])
            batch = worker_pb2.PrefillBatch(requests=[worker_pb2.PrefillRequest(
                request_id="intruder", input_ids=[1, 2, 3], ticket=ticket,
                sampling=worker_pb2.SamplingParams(max_new_tokens=4))])
            calls = [lambda md: d.Reserve(reserve, metadata=md),
                     lambda md: d.Stats(worker_pb2.StatsRequest(), metadata=md),
                     lambda md: d.Release(worker_pb2.ReleaseRequest(request_id="x"), metadata=md),
                     lambda md: d.StreamTokens(worker_pb2.StreamRequest(), metadata=md).read(),
                     lambda md: d.Health(worker_pb2.HealthRequest(), metadata=md),
                     lambda md: p.Prefill(batch, metadata=md),
                     lambda md: p.Health(worker_pb2.HealthRequest(), metadata=md)]
            codes = []
            for call in calls:
                for metadata in (None, (WRONG,)):
                    try:
                        await call(metadata)
                        codes.append("OK")
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code().name)
            after = await AuthorizedStub(d, token_from_env()).Stats(worker_pb2.StatsRequest())
            return before, after, codes

    before, after, codes = run(main())
    assert codes == ["UNAUTHENTICATED"] * 14, codes
    assert (after.free_pages, after.free_slots, after.waiting) == (before.free_pages, before.free_slots, 0)
    assert after.free_pages == after.num_pages
    log = "\n".join(deployment["decode"].log_tail)
    assert "refused /sparsepd.worker.DecodeWorker/Reserve from ipv4:127.0.0.1:" in log and "wrong cluster token" in log


def test_server_info_shows_addresses_only_with_the_token(deployment):
    async def main():
        async with channel(deployment["router"], deployment["ca"]) as ch:
            public, insider = pb_grpc.SglangSchedulerStub(ch), stub_of(ch)
            return [(await s.GetServerInfo(pb.GetServerInfoRequest()), await s.GetLoads(pb.GetLoadsRequest()))
                    for s in (public, insider)]

    (public, public_loads), (insider, insider_loads) = run(main())
    addresses = {deployment["decode"].ready["grpc"], deployment["prefill"].ready["grpc"]}
    text = str(public) + str(public_loads)
    assert not any(a in text for a in addresses) and "127.0.0.1" not in text, text
    assert sorted(w["role"] for w in public.scheduler_info["workers"]) == ["decode", "prefill"]
    assert "preset" in public.server_args and "prefill" not in public.server_args
    assert {w["address"] for w in insider.scheduler_info["workers"]} == addresses
    assert {x.worker_address for x in insider_loads.loads} == addresses


def test_a_push_from_a_peer_without_the_key_is_rejected_and_writes_nothing(deployment):
    """A real reservation's ticket (transfer id, request id, fingerprint), pushed over zmq by a peer that lacks
    the deployment's key: a missing tag and a forged one are both rejected as unauthenticated and counted; the
    reservation keeps its pages untouched until released."""
    import zmq

    decode = deployment["decode"].ready

    async def reserve_and_stats(release: bool = False):
        async with channel(decode["grpc"], deployment["ca"]) as ch:
            d = AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(ch), token_from_env())
            if release:
                await d.Release(worker_pb2.ReleaseRequest(request_id="pushed"))
                return None, await d.Stats(worker_pb2.StatsRequest())
            ticket = (await d.Reserve(worker_pb2.ReserveRequest(
                request_id="pushed", prompt_len=20, sampling=worker_pb2.SamplingParams(max_new_tokens=4)))).ticket
            return ticket, await d.Stats(worker_pb2.StatsRequest())

    ticket, reserved = run(reserve_and_stats())
    header = TransferHeader(transfer_id=ticket.transfer_id, request_id="pushed", fingerprint=ticket.fingerprint,
                            position=20, num_pages=len(ticket.page_ids), output_ids=(7,), sampler_state=bytes(16),
                            tensors=())
    encoded = header.encode()
    other_key = derive_key("another-deployment-token-0123", "transfer")
    replies = []
    ctx = zmq.Context()
    try:
        for tag in (b"", header_tag(other_key, encoded)):
            sock = ctx.socket(zmq.DEALER)
            sock.connect(ticket.endpoint)
            sock.send_multipart([encoded, tag])
            assert sock.poll(10_000), "no ack from the decode worker"
            replies.append(sock.recv())
            sock.close(linger=0)
    finally:
        ctx.term()
    _, released = run(reserve_and_stats(release=True))
    assert [b"unauthenticated" in r for r in replies] == [True, True], replies
    assert reserved.rejected["unauthenticated"] == 0 and released.rejected["unauthenticated"] == 2
    assert reserved.waiting == 1 and reserved.free_pages == reserved.num_pages - len(ticket.page_ids)
    assert (released.free_pages, released.free_slots, released.waiting, released.running) == (
        released.num_pages, released.num_slots, 0, 0)


def test_tls_serves_a_client_with_the_ca_only(deployment, certs):
    async def attempt(credentials) -> str:
        ch = (grpc.aio.insecure_channel(deployment["router"]) if credentials is None
              else grpc.aio.secure_channel(deployment["router"], credentials))
        async with ch:
            try:
                _, done = await collect(pb_grpc.SglangSchedulerStub(ch), generate_request([1, 2, 3], 3), timeout=20)
                return done
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

    async def main():
        return [await attempt(grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())),
                await attempt(None),
                await attempt(grpc.ssl_channel_credentials(root_certificates=certs["other-ca"].read_bytes()))]

    served, plaintext, untrusted = run(main())
    assert served.finish_reason == "length" and len(served.output_ids) == 3
    assert (plaintext, untrusted) == ("UNAVAILABLE", "UNAVAILABLE")


def test_mutual_tls_refuses_a_client_without_a_certificate(certs):
    """sparsepd.tls on an in-process server: --tls-client-ca asks every client for a certificate."""
    node, key, ca = certs["node"].read_bytes(), certs["node_key"].read_bytes(), certs["ca"].read_bytes()

    async def main():
        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(_WouldBeWorker("0123456789abcdef"), server)
        port = add_port(server, "127.0.0.1:0", TlsConfig(cert_pem=node, key_pem=key, client_ca_pem=ca))
        await server.start()
        results = []
        try:
            for credentials in (grpc.ssl_channel_credentials(ca, key, node), grpc.ssl_channel_credentials(ca)):
                async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as ch:
                    try:
                        reply = await worker_pb2_grpc.DecodeWorkerStub(ch).Health(worker_pb2.HealthRequest(),
                                                                                 timeout=10)
                        results.append(reply.role)
                    except grpc.aio.AioRpcError as exc:
                        results.append(exc.code().name)
        finally:
            await server.stop(None)
        return results

    assert run(main()) == ["decode", "UNAVAILABLE"]


def test_serve_with_tls_runs_every_port_over_tls(certs):
    """`sparsepd serve --tls-cert --tls-key --cluster-tls-ca`: the workers register with the router over its TLS
    port, a client with the CA is served, a plaintext one is not; without --cluster-tls-ca serve refuses."""
    tls = ["--tls-cert", str(certs["node"]), "--tls-key", str(certs["node_key"])]
    refused = subprocess.run([sys.executable, "-m", "sparsepd", "serve", "--port", "0", *tls], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "--cluster-tls-ca" in refused.stderr
    child = start("serve", ["serve", "--preset", "tiny",
                            "--port", "0", "--metrics-port", "-1", "--num-slots", "4", "--num-pages", "64",
                            *tls, "--cluster-tls-ca", str(certs["ca"])], timeout_s=240)
    try:
        async def main():
            credentials = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
            async with grpc.aio.secure_channel(child.ready["grpc"], credentials) as ch:
                _, done = await collect(pb_grpc.SglangSchedulerStub(ch), generate_request([1, 2, 3], 3), timeout=60)
            async with grpc.aio.insecure_channel(child.ready["grpc"]) as ch:
                try:
                    await collect(pb_grpc.SglangSchedulerStub(ch), generate_request([1, 2, 3], 3), timeout=20)
                    plaintext = "served"
                except grpc.aio.AioRpcError as exc:
                    plaintext = exc.code().name
            return done, plaintext

        done, plaintext = run(main())
    finally:
        stop(child)
    assert done.finish_reason == "length" and len(done.output_ids) == 3
    assert plaintext == "UNAVAILABLE"
