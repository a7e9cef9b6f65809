"""bench/cpu_quota.py: a busy process under a 0.2-core quota gets about 0.2 core, and
the kernel counts the throttled periods (root only: cgroups)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cpu_quota import CpuQuota, QuotaUnavailable


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_busy_process_gets_its_quota_and_is_throttled() -> None:
    if os.geteuid() != 0:
        pytest.skip("cgroups need root here")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        try:
            quota = CpuQuota(busy.pid, 0.2)
            with quota:
                before, throttled_before, began = _cpu_s(busy.pid), quota.throttling(), time.monotonic()
                time.sleep(1.5)
                share = (_cpu_s(busy.pid) - before) / (time.monotonic() - began)
                window = quota.throttling().since(throttled_before)
            assert not quota.path.exists()  # removed, the process moved back
        except QuotaUnavailable as error:
            pytest.skip(str(error))
    finally:
        busy.kill()
        busy.wait()
    assert 0.1 < share < 0.3, share
    assert window.periods > 50 and window.throttled / window.periods > 0.8, window


def test_quotas_below_the_kernels_minimum_are_refused() -> None:
    with pytest.raises(QuotaUnavailable, match="1 ms minimum"):
        CpuQuota(os.getpid(), 0.05, period_s=0.01)
