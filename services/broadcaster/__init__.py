"""Reconfiguration Broadcast: two-phase epoch rollouts (PREPARE / READY / COMMIT / ABORT)."""
