"""Exceptions: each says which call failed, on what, and the gateway's own reason."""

from __future__ import annotations

import grpc


class ChannelgateError(Exception):
    """A gateway call failed.

    `call` is the gRPC method (`Publish`, `Disconnect`, ...), `what` a short account of the
    request (`group 'table-1'`), `code` the gRPC status and `details` the gateway's message
    (for INVALID_ARGUMENT it starts with the field: `payload: must be a JSON object`).
    """

    def __init__(
        self,
        call: str,
        what: str,
        code: grpc.StatusCode | None,
        details: str,
        target: str = "",
    ) -> None:
        self.call = call
        self.what = what
        self.code = code
        self.details = details
        self.target = target
        status = code.name if code is not None else "ERROR"
        where = f" at {target}" if target else ""
        super().__init__(f"channelgate {call} ({what}){where} failed: {status}: {details}")


class Unavailable(ChannelgateError):
    """The gateway cannot be reached, or its bus (Redis) is down: UNAVAILABLE.

    Publish was already retried once. The call may be repeated; a Publish that timed out
    against a frozen Redis may still be delivered, so a repeat can deliver it twice.
    """


class DeadlineExceeded(ChannelgateError):
    """No answer within the deadline: the request may or may not have been carried out."""


class InvalidArgument(ChannelgateError):
    """The gateway refused the request as malformed; `details` names the field."""


class Unauthenticated(ChannelgateError):
    """The API key is missing or wrong."""


_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(
    call: str, what: str, error: grpc.RpcError, target: str
) -> ChannelgateError:
    """The exception for a failed call: the class follows the status code."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, ChannelgateError) if code is not None else ChannelgateError
    return cls(call, what, code, details, target)
