"""Control-plane messages: frozen, strict pydantic models carried in the codec's envelope.

Every subclass of `Message` registers itself under its class name (its wire ``kind``).
Events are named in the past tense (`TokenGenerated`), commands in the imperative
(`PrepareEpoch`). To add a message: write the class in the module of its area (base,
nodes, plans, requests, monitor, decisions, privacy, rollouts, reviser), export it here, and
declare the topic that carries it in shared/topics.py (one line). Tuples, not lists:
messages are immutable.
"""

from shared.messages.base import (
    MAX_ITEMS,
    MESSAGE_KINDS,
    Epoch,
    LongText,
    Message,
    NonNegativeFloat,
    NonNegativeInt,
    Segment,
    ShortText,
    TokenId,
)
from shared.messages.decisions import (
    Candidate,
    DecisionRecorded,
)
from shared.messages.monitor import (
    CapacityProfile,
    EmulatedLink,
    EmulationApplied,
    EmulationCommand,
    Evidence,
    LayerCost,
    LinkCapacity,
    LinkDegraded,
    LinkRecovered,
    NodeCapacity,
    NodeDown,
    NodeJoined,
    NodeOverloadCleared,
    NodeOverloaded,
    ProfileEvent,
)
from shared.messages.nodes import (
    BlockTimes,
    LinkObservation,
    NodeStatus,
    ServiceStatus,
    Telemetry,
)
from shared.messages.plans import (
    AbortEpoch,
    CommitEpoch,
    EpochReady,
    EpochRejected,
    LinkPrecision,
    Plan,
    PrepareEpoch,
)
from shared.messages.privacy import (
    PrivacyPolicy,
    PrivacyPolicySet,
)
from shared.messages.requests import (
    EmbeddingReady,
    EmbedRequest,
    GenerateRequest,
    RequestFailed,
    RequestFinished,
    TokenGenerated,
)
from shared.messages.reviser import (
    PlanOption,
    PlanProposed,
    PlanRequested,
    PlanWeights,
)
from shared.messages.rollouts import (
    EpochLedger,
    RolloutFinished,
    RolloutRequested,
)

__all__ = [
    "AbortEpoch",
    "BlockTimes",
    "Candidate",
    "CapacityProfile",
    "CommitEpoch",
    "DecisionRecorded",
    "EmbedRequest",
    "EmbeddingReady",
    "EmulatedLink",
    "EmulationApplied",
    "EmulationCommand",
    "Epoch",
    "EpochLedger",
    "EpochReady",
    "EpochRejected",
    "Evidence",
    "GenerateRequest",
    "LayerCost",
    "LinkCapacity",
    "LinkDegraded",
    "LinkObservation",
    "LinkRecovered",
    "LongText",
    "MAX_ITEMS",
    "MESSAGE_KINDS",
    "Message",
    "NodeCapacity",
    "NodeDown",
    "NodeJoined",
    "NodeOverloadCleared",
    "NodeOverloaded",
    "NodeStatus",
    "ServiceStatus",
    "NonNegativeFloat",
    "NonNegativeInt",
    "Plan",
    "PlanOption",
    "PlanProposed",
    "PlanRequested",
    "PlanWeights",
    "PrepareEpoch",
    "PrivacyPolicy",
    "PrivacyPolicySet",
    "ProfileEvent",
    "RequestFailed",
    "RequestFinished",
    "RolloutFinished",
    "RolloutRequested",
    "LinkPrecision",
    "Segment",
    "ShortText",
    "Telemetry",
    "TokenGenerated",
    "TokenId",
]
