"""Chat with the internal token: sessions and order lookups follow the trusted caller (never the request
body), another user's session does not exist, logs carry no session id, and chat's own calls to the
sentiment service carry the token over mutual TLS."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc

from services.chat.store import session_hash
from tests.chat.conftest import Prepared, chat_settings, converse, running
from tests.gateway.backends import Recorder, make_server
from tests.gateway.certs import make_pki
from tests.support import token_file, trusted_channel, with_token

ORDER = "Where is my order CB-100231?"  # u-1001's order
TRACKING = "JD014600006281"


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def test_sessions_and_orders_belong_to_the_trusted_caller(prepared: Prepared, state_dir: Path) -> None:
    async with running(with_token(chat_settings(prepared, state_dir))) as (server, plain):
        address = f"127.0.0.1:{server.grpc_port}"
        async with (
            trusted_channel(address, "u-1001", ()) as c1,
            trusted_channel(address, "u-1002", ()) as c2,
            trusted_channel(address, "", ("admin",)) as admin_channel,
        ):
            one, two = chat_pb2_grpc.ChatServiceStub(c1), chat_pb2_grpc.ChatServiceStub(c2)
            admin = chat_pb2_grpc.ChatServiceStub(admin_channel)
            assert await code_of(converse(plain, ORDER, user_id="u-1001")) == grpc.StatusCode.UNAUTHENTICATED
            # The body's user_id counts for nothing once the caller is known.
            _, theirs = await converse(two, ORDER, user_id="u-1001")
            assert TRACKING not in theirs.answer
            _, mine = await converse(one, ORDER, user_id="u-1002")
            assert TRACKING in mine.answer
            sid = chat_pb2.GetSessionRequest(session_id=mine.session_id)
            end = chat_pb2.EndSessionRequest(session_id=mine.session_id)
            assert (await one.GetSession(sid)).session.user_id == "u-1001"
            # Another user: NOT_FOUND, never "not yours".
            assert await code_of(two.GetSession(sid)) == grpc.StatusCode.NOT_FOUND
            assert await code_of(two.EndSession(end)) == grpc.StatusCode.NOT_FOUND
            follow_up = converse(two, "and now?", session_id=mine.session_id, user_id="u-1001")
            assert await code_of(follow_up) == grpc.StatusCode.NOT_FOUND
            # An admin may end it (not read it); then it is gone for its owner.
            assert await code_of(admin.GetSession(sid)) == grpc.StatusCode.NOT_FOUND
            assert (await admin.EndSession(end)).ended
            assert await code_of(one.GetSession(sid)) == grpc.StatusCode.NOT_FOUND


async def test_logs_carry_a_hash_of_the_session_id_never_the_id(
    prepared: Prepared, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(chat_settings(prepared, state_dir, access_log=True)) as (_, stub):
        _, first = await converse(stub, ORDER, user_id="u-1001")
        sid = first.session_id
        await converse(stub, "and when will it arrive?", session_id=sid, user_id="u-1001")
        await stub.GetSession(chat_pb2.GetSessionRequest(session_id=sid))
        await stub.EndSession(chat_pb2.EndSessionRequest(session_id=sid))
        assert await code_of(stub.GetSession(chat_pb2.GetSessionRequest(session_id=sid))) == (
            grpc.StatusCode.NOT_FOUND
        )
    records = [r for r in caplog.records if r.name.startswith("cbec")]
    assert any(r.getMessage() == "converse" for r in records)
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in records)
    assert sid not in logged
    converse_logs = [r for r in records if r.getMessage() == "converse"]
    assert {getattr(r, "chat_session", None) for r in converse_logs} == {session_hash(sid)}


async def test_chat_calls_sentiment_with_the_token_over_mutual_tls(
    prepared: Prepared, state_dir: Path, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    recorder = Recorder()
    sentiment = make_server(
        "sentiment",
        tmp_path / "models",
        recorder,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,  # mutual TLS: no client certificate, no connection
    )
    await sentiment.start()
    try:
        tls = dict(
            sentiment_addr=f"localhost:{sentiment.grpc_port}",
            backend_tls_ca_file=pki.ca,
            backend_tls_cert_file=pki.client_cert,
            backend_tls_key_file=pki.client_key,
        )
        # Without the token, sentiment refuses chat's call: chat falls back to its heuristic.
        async with running(chat_settings(prepared, state_dir, **tls)) as (_, stub):
            await converse(stub, "How long does shipping to Spain take?", user_id="u-1001")
        assert not recorder.of("Analyze")
        settings = chat_settings(prepared, state_dir, internal_token_file=token_file(), **tls)
        async with (
            running(settings) as (server, _),
            trusted_channel(f"127.0.0.1:{server.grpc_port}", "u-1001", ()) as channel,
        ):
            await converse(chat_pb2_grpc.ChatServiceStub(channel), "How long does shipping to Spain take?")
        (call,) = recorder.of("Analyze")
        assert call.trusted and call.user == "u-1001"  # chat passes on whom the call is for
    finally:
        await sentiment.stop(grace=0)


async def test_a_conversations_request_id_reaches_sentiment(
    prepared: Prepared, state_dir: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    sentiment = make_server("sentiment", tmp_path / "models", recorder, token=False)
    await sentiment.start()
    try:
        settings = chat_settings(prepared, state_dir, sentiment_addr=f"127.0.0.1:{sentiment.grpc_port}")
        async with running(settings) as (_, stub):
            request = chat_pb2.ConverseRequest(message="How long does shipping to Spain take?")
            call = stub.Converse(request, timeout=120, metadata=(("x-request-id", "rid-chat-42"),))
            chunks = [chunk async for chunk in call]
        assert chunks[-1].WhichOneof("chunk") == "result"
        (analyze,) = recorder.of("Analyze")
        assert analyze.request_id == "rid-chat-42"  # chat's log line and sentiment's carry the same id
    finally:
        await sentiment.stop(grace=0)
