from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PeerPacket(_message.Message):
    __slots__ = ("Data", "batch")
    DATA_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    Data: bytes
    batch: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, Data: _Optional[bytes] = ..., batch: _Optional[_Iterable[bytes]] = ...) -> None: ...
