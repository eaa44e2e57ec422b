"""channelgate: publish real-time events to browsers through a channelgate gateway.

`Client` wraps the gateway's gRPC API and needs nothing but grpcio and protobuf;
`channelgate.django` is a Django Channels layer and the authorizer view, and
`channelgate.baserow` the permission checks of a Baserow backend.
"""

from .client import Client, Event, NodeInfo, Payload, PermissionCheck, Subscription
from .errors import (
    ChannelgateError,
    DeadlineExceeded,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "ChannelgateError",
    "Client",
    "DeadlineExceeded",
    "Event",
    "InvalidArgument",
    "NodeInfo",
    "Payload",
    "PermissionCheck",
    "Subscription",
    "Unauthenticated",
    "Unavailable",
]
