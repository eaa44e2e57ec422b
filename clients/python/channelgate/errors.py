"""Exceptions: each says which call failed, on what, and the gateway's own reason."""

from __future__ import annotations

import grpc


class ChannelgateError(Exception):
    """A gateway call failed.

    `call` is the gRPC method (`Publish`, `Disconnect`, ...), `what` a short account of the
    request (`group 'table-1'`), `code` the gRPC status of the last attempt and `details`
    its message (for INVALID_ARGUMENT it starts with the field: `payload: must be a JSON
    object`); `attempts` the attempts made and `elapsed` the seconds they took.
    """

    def __init__(
        self,
        call: str,
        what: str,
        code: grpc.StatusCode | None,
        details: str,
        target: str = "",
        *,
        attempts: int = 1,
        elapsed: float = 0.0,
    ) -> None:
        self.call = call
        self.what = what
        self.code = code
        self.details = details
        self.target = target
        self.attempts = attempts
        self.elapsed = elapsed
        status = code.name if code is not None else "ERROR"
        where = f" at {target}" if target else ""
        tried = (
            f" (gave up after {attempts} attempts in {elapsed:.1f} s)"
            if attempts > 1
            else ""
        )
        super().__init__(
            f"channelgate {call} ({what}){where} failed: {status}: {details}{tried}"
        )


class Unavailable(ChannelgateError):
    """The gateway cannot be reached, or its bus (Redis) is down: UNAVAILABLE, on every
    attempt until the call's deadline.

    Nothing was published by the last attempt; an earlier attempt that ended in
    DEADLINE_EXCEEDED may have been. Repeating a publish with the same idempotency key
    (`Event.with_key`) publishes it at most once.
    """


class DeadlineExceeded(ChannelgateError):
    """No answer within the deadline, or the gateway gave up waiting on its bus: the
    request may or may not have been carried out. A publish repeated with the same
    idempotency key is published at most once; CheckPermission and Disconnect are safe
    to repeat."""


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
    call: str,
    what: str,
    error: grpc.RpcError,
    target: str,
    *,
    attempts: int = 1,
    elapsed: float = 0.0,
) -> ChannelgateError:
    """The exception for a failed call: the class follows the status code."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, ChannelgateError) if code is not None else ChannelgateError
    return cls(call, what, code, details, target, attempts=attempts, elapsed=elapsed)
