from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AuthorizeRequest(_message.Message):
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
    def __init__(self, user_id: _Optional[int] = ..., web_socket_id: _Optional[str] = ..., page: _Optional[str] = ..., parameters: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ["allowed", "presence_space"]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_SPACE_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    presence_space: str
    def __init__(self, allowed: bool = ..., presence_space: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ["token_id", "token_issued_at", "user_id", "web_socket_id"]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    WEB_SOCKET_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    token_issued_at: int
    user_id: int
    web_socket_id: str
    def __init__(self, user_id: _Optional[int] = ..., web_socket_id: _Optional[str] = ..., token_issued_at: _Optional[int] = ..., token_id: _Optional[str] = ...) -> None: ...
