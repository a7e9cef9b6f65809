"""Validated identifiers.

Any id that becomes an MQTT topic level (node ids, cluster names, request ids) accepts
only ``[A-Za-z0-9_-]`` and 1-64 characters: a ``/`` would defeat ACL patterns such as
``workers/%c/#`` and ``+``/``#`` are wildcards (facts.md).
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, NewType

from pydantic import AfterValidator

from shared.errors import InvalidId

_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")

NodeId = NewType("NodeId", str)
ClusterId = NewType("ClusterId", str)
RequestId = NewType("RequestId", str)
PlanEpoch = NewType("PlanEpoch", int)


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid topic-level id, else raise InvalidId."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise InvalidId(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return value


def node_id(value: str) -> NodeId:
    return NodeId(validate_id(value, "node id"))


def cluster_id(value: str) -> ClusterId:
    return ClusterId(validate_id(value, "cluster id"))


def request_id(value: str) -> RequestId:
    return RequestId(validate_id(value, "request id"))


def new_request_id() -> RequestId:
    """A fresh random request id (16 hex characters)."""
    return RequestId(secrets.token_hex(8))


def _pydantic_id(value: str) -> str:
    try:
        return validate_id(value)
    except InvalidId as error:  # pydantic wants ValueError to report a field error
        raise ValueError(str(error)) from None


# For fields of pydantic models.
TopicId = Annotated[str, AfterValidator(_pydantic_id)]

# Distinct id types for fields of pydantic models: each validates like TopicId and
# keeps its NewType for type checkers (a RequestId is not a NodeId).
NodeIdField = Annotated[NodeId, AfterValidator(_pydantic_id)]
RequestIdField = Annotated[RequestId, AfterValidator(_pydantic_id)]
ClusterIdField = Annotated[ClusterId, AfterValidator(_pydantic_id)]
