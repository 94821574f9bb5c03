"""Requests whose bytes are not a valid protobuf message (garbage, truncated, a string field with invalid
UTF-8) answer INVALID_ARGUMENT naming the message type, instead of gRPC's generic INTERNAL "Exception
deserializing request": a server interceptor swaps each handler's parser for one that returns a marker,
and the handler answers the marker before any servicer code runs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Malformed:
    why: str


def _lenient(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad input
            return Malformed(f"{type(exc).__name__}: {exc}")

    return deserialize


def _message(handler_call_details, why: str) -> str:
    return f"{handler_call_details.method}: the request bytes are not a valid protobuf message ({why})"


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        details = handler_call_details
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(details, request.why))
                return await inner(request, context)

            return handler._replace(unary_unary=unary_unary,
                                    request_deserializer=_lenient(handler.request_deserializer))
        inner_stream = handler.unary_stream
        if not inspect.isasyncgenfunction(inner_stream):
            return handler  # a handler that writes with context.write (health Watch): left as gRPC made it

        async def unary_stream(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(details, request.why))
            async for response in inner_stream(request, context):
                yield response

        return handler._replace(unary_stream=unary_stream, request_deserializer=_lenient(handler.request_deserializer))
