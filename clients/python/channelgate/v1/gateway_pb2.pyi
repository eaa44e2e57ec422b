from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckPermissionRequest(_message.Message):
    __slots__ = ["dry_run", "group", "permission_group", "revoke", "user_ids"]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_GROUP_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    group: str
    permission_group: str
    revoke: bool
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_ids: _Optional[_Iterable[int]] = ..., permission_group: _Optional[str] = ..., group: _Optional[str] = ..., revoke: bool = ..., dry_run: bool = ...) -> None: ...

class CheckPermissionResponse(_message.Message):
    __slots__ = ["checked", "nodes", "revoked"]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    checked: int
    nodes: int
    revoked: _containers.RepeatedCompositeFieldContainer[Subscription]
    def __init__(self, checked: _Optional[int] = ..., revoked: _Optional[_Iterable[_Union[Subscription, _Mapping]]] = ..., nodes: _Optional[int] = ...) -> None: ...

class DisconnectRequest(_message.Message):
    __slots__ = ["ignore_web_socket_ids", "user_ids"]
    IGNORE_WEB_SOCKET_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    ignore_web_socket_ids: _containers.RepeatedScalarFieldContainer[str]
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_ids: _Optional[_Iterable[int]] = ..., ignore_web_socket_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DisconnectResponse(_message.Message):
    __slots__ = ["disconnected", "nodes"]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    disconnected: int
    nodes: int
    def __init__(self, disconnected: _Optional[int] = ..., nodes: _Optional[int] = ...) -> None: ...

class IndividualTarget(_message.Message):
    __slots__ = ["payloads"]
    class PayloadsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    payloads: _containers.ScalarMap[int, str]
    def __init__(self, payloads: _Optional[_Mapping[int, str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ["nodes"]
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ["connections", "groups", "node_id", "presence_members", "presence_spaces", "subscriptions", "uptime_seconds", "users", "version"]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_SPACES_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    connections: int
    groups: int
    node_id: str
    presence_members: int
    presence_spaces: int
    subscriptions: int
    uptime_seconds: int
    users: int
    version: str
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., connections: _Optional[int] = ..., users: _Optional[int] = ..., groups: _Optional[int] = ..., subscriptions: _Optional[int] = ..., uptime_seconds: _Optional[int] = ..., presence_spaces: _Optional[int] = ..., presence_members: _Optional[int] = ...) -> None: ...

class PublishBatchRequest(_message.Message):
    __slots__ = ["events"]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[PublishRequest]
    def __init__(self, events: _Optional[_Iterable[_Union[PublishRequest, _Mapping]]] = ...) -> None: ...

class PublishBatchResponse(_message.Message):
    __slots__ = ["event_ids"]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    event_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, event_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ["exclude_user_ids", "group", "idempotency_key", "ignore_web_socket_id", "individual", "lost", "payload", "skip_history", "users"]
    EXCLUDE_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    IGNORE_WEB_SOCKET_ID_FIELD_NUMBER: _ClassVar[int]
    INDIVIDUAL_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SKIP_HISTORY_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    exclude_user_ids: _containers.RepeatedScalarFieldContainer[int]
    group: str
    idempotency_key: str
    ignore_web_socket_id: str
    individual: IndividualTarget
    lost: bool
    payload: str
    skip_history: bool
    users: UserTarget
    def __init__(self, group: _Optional[str] = ..., users: _Optional[_Union[UserTarget, _Mapping]] = ..., individual: _Optional[_Union[IndividualTarget, _Mapping]] = ..., payload: _Optional[str] = ..., ignore_web_socket_id: _Optional[str] = ..., exclude_user_ids: _Optional[_Iterable[int]] = ..., skip_history: bool = ..., idempotency_key: _Optional[str] = ..., lost: bool = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ["event_id"]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    def __init__(self, event_id: _Optional[int] = ...) -> None: ...

class Subscription(_message.Message):
    __slots__ = ["group", "page", "parameters", "user_id", "web_socket_id"]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    WEB_SOCKET_ID_FIELD_NUMBER: _ClassVar[int]
    group: str
    page: str
    parameters: str
    user_id: int
    web_socket_id: str
    def __init__(self, web_socket_id: _Optional[str] = ..., user_id: _Optional[int] = ..., page: _Optional[str] = ..., parameters: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class UserTarget(_message.Message):
    __slots__ = ["all_users", "user_ids"]
    ALL_USERS_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    all_users: bool
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_ids: _Optional[_Iterable[int]] = ..., all_users: bool = ...) -> None: ...
