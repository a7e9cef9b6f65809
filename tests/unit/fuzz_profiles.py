"""Hypothesis settings for the decoder fuzz tests (tests/unit/test_fuzz_*.py).

Two profiles, used only by the fuzz tests (as ``@FUZZ`` decorators, so no other
hypothesis test changes):

- ``fuzz-ci``: 10,000 examples per test, loaded when the environment variable ``CI`` is
  set (any value but empty, "0", "false" or "no"), as CI's fast tier does; about 85 s of
  CPU for the five decoders together (measured 2026-12-06 on the 2-core dev box);
- ``fuzz-dev``: 300 examples per test for local runs (a few seconds per module).

Both have no per-example deadline (this machine's timing is too noisy for one) and keep
their example database in the repository, ``tests/fuzz-db/``, so a failure found once
(in CI or locally) is replayed first on every later run; commit what appears there.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

FUZZ_DB = Path(__file__).resolve().parent.parent / "fuzz-db"
CI_EXAMPLES = 10_000
DEV_EXAMPLES = 300

_COMMON = {
    "deadline": None,
    "database": DirectoryBasedExampleDatabase(str(FUZZ_DB)),
    # Generated documents are big by design (whole topologies, manifests).
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
# Both draw new examples each run and replay what the database holds first: a failure
# found once (it prints its reproducing seed) is kept in tests/fuzz-db/ and tried first
# on every later run. (Hypothesis refuses derandomize together with a database.)
settings.register_profile("fuzz-ci", max_examples=CI_EXAMPLES, **_COMMON)
settings.register_profile("fuzz-dev", max_examples=DEV_EXAMPLES, **_COMMON)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


FUZZ = settings.get_profile("fuzz-ci" if in_ci() else "fuzz-dev")
"""The settings every fuzz test is decorated with."""
