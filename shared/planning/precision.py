"""Precision choices in the planning problem: the policy and the byte counts (pure).

A problem may carry a ``precision`` policy (docs/PLANNER.md, "Precision"). Without one,
or with the ``exact`` policy, every link carries fp32 activations and every block holds
fp32 weights: the contract's cost model, unchanged. With one, the planner chooses

- per link (hop) an activation precision from ``activations``: the bytes a token's
  activation takes on the wire are counted per element (fp32 4, fp16 2, int8 1 plus a
  4-byte float scale per row; the cost model is per token, one row);
- per segment a weight precision from ``weights``: a block's ``weight_bytes`` (the fp32
  bytes its host holds) times the held-bytes factor of that precision.

A lossy choice costs quality. The policy gives each lossy precision its loss (a top-1
disagreement with fp32, a fraction, as ``bench/quality.py`` measures it); a plan's loss
is the largest weight loss among its segments plus the sum of its hops' activation
losses, and must stay within ``quality_budget``. A lossy activation precision is only
worth taking where it saves at least ``min_saving_s`` per token on its hop, so fast
links stay exact.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ActivationPrecision = Literal["fp32", "fp16", "int8"]
"""What activation frames can carry (``shared.tensor_frame.ACTIVATION_PRECISIONS``)."""
WeightPrecision = Literal["fp32", "bf16", "int8", "int4"]
"""What shards can hold (``shared.model.quant.PRECISIONS``)."""

ACTIVATION_ORDER: tuple[ActivationPrecision, ...] = ("fp32", "fp16", "int8")
"""Most exact first: ties go to the earlier one."""
WEIGHT_ORDER: tuple[WeightPrecision, ...] = ("fp32", "bf16", "int8", "int4")

ACTIVATION_SCALE_BYTES = 4
"""int8 frames carry one float32 scale per row (``shared.tensor_frame``)."""

WEIGHT_BYTES_FACTOR: dict[str, float] = {"fp32": 1.0, "bf16": 0.5, "int8": 0.4, "int4": 0.4}
"""Held bytes per fp32 held byte. bf16 halves them. int8 (and int4, dequantised to the
same int8 kernel at load) hold 1.6 bytes per parameter in fbgemm's packed matrices on
SmolLM2's shapes (1.8 for 576-wide inputs, 1.01 for down_proj; docs/PERFORMANCE.md,
"Memory"): 1.6 / 4 = 0.4, not the 0.25 the count of int8 values suggests."""

LOSS_TOLERANCE = 1e-9
"""Losses summing to the budget fit it (three hops of 0.01 in a budget of 0.03: their
float sum may round above it)."""

Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=False)]
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class PrecisionPolicy(BaseModel):
    """Which precisions the planner may choose, and at what quality cost.

    ``activations`` / ``weights`` list the allowed precisions (fp32 is always allowed).
    ``activation_loss`` / ``weight_loss`` give each allowed lossy precision its loss
    (fraction of top-1 disagreement with fp32); a lossy precision the policy allows
    must have one. ``quality_budget``: the most loss a plan may have.
    ``min_saving_s``: a lossy activation precision must save at least this many seconds
    per token on its hop.
    """

    model_config = _FROZEN
    activations: tuple[ActivationPrecision, ...] = ("fp32",)
    weights: tuple[WeightPrecision, ...] = ("fp32",)
    quality_budget: Fraction = 0.0
    activation_loss: dict[ActivationPrecision, Fraction] = Field(default_factory=dict)
    weight_loss: dict[WeightPrecision, Fraction] = Field(default_factory=dict)
    min_saving_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.001

    @model_validator(mode="after")
    def _losses_given(self) -> PrecisionPolicy:
        for kind, allowed, losses in (("activation", self.activations, self.activation_loss),
                                      ("weight", self.weights, self.weight_loss)):  # fmt: skip
            for precision in allowed:
                if precision != "fp32" and precision not in losses:
                    raise ValueError(f"{kind}_loss: no loss given for allowed {kind} precision "
                                     f"{precision!r} (measure it with bench/quality.py)")  # fmt: skip
        return self

    @classmethod
    def exact(cls) -> PrecisionPolicy:
        """fp32 only: the contract's cost model."""
        return cls()

    def activation_loss_of(self, precision: str) -> float:
        return 0.0 if precision == "fp32" else float(self.activation_loss.get(precision, 1.0))  # type: ignore[call-overload]

    def weight_loss_of(self, precision: str) -> float:
        return 0.0 if precision == "fp32" else float(self.weight_loss.get(precision, 1.0))  # type: ignore[call-overload]

    def usable_activations(self) -> tuple[ActivationPrecision, ...]:
        """Allowed activation precisions whose loss alone fits the budget, most exact first."""
        return tuple(p for p in ACTIVATION_ORDER if p == "fp32" or (
            p in self.activations and self.activation_loss_of(p) <= self.quality_budget))

    def usable_weights(self) -> tuple[WeightPrecision, ...]:
        """Allowed weight precisions whose loss alone fits the budget, most exact first."""
        return tuple(p for p in WEIGHT_ORDER if p == "fp32" or (
            p in self.weights and self.weight_loss_of(p) <= self.quality_budget))


def activation_bytes(fp32_bytes: float, precision: str) -> float:
    """Bytes one token's activation of ``fp32_bytes`` (as fp32) takes at ``precision``."""
    if precision == "fp32":
        return fp32_bytes
    if precision == "fp16":
        return fp32_bytes / 2
    if precision == "int8":
        return fp32_bytes / 4 + ACTIVATION_SCALE_BYTES
    raise ValueError(f"unknown activation precision {precision!r}")


def weight_bytes(fp32_bytes: float, precision: str) -> float:
    """Held bytes of weights that take ``fp32_bytes`` in fp32, at ``precision``."""
    return fp32_bytes * WEIGHT_BYTES_FACTOR[precision]
