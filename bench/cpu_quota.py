"""A CPU quota for one process (the bench's broker): a cgroup of its own with
``quota_s`` of CPU per ``period_s`` (0.25 core = 2.5 ms per 10 ms).

cgroup v2 (``cpu.max`` in a child of /sys/fs/cgroup with the cpu controller enabled)
where the machine has it, else cgroup v1's cpu controller (``cpu.cfs_quota_us`` and
``cpu.cfs_period_us`` under /sys/fs/cgroup/cpu). Needs root (or a delegated cgroup).
``throttling()`` reads the kernel's own count of periods in which the quota ran out, so
a result can show the quota was what limited the process.

A short period (10 ms, not the kernel's 100 ms default) keeps a throttled process's
stalls short: with 100 ms and 0.25 core it would sit out up to 75 ms of every period,
which alone would make every p99 latency above 50 ms.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from shared.errors import EdgesplitError

V2_ROOT = Path("/sys/fs/cgroup")
V1_CPU = Path("/sys/fs/cgroup/cpu")


class QuotaUnavailable(EdgesplitError):
    """No cgroup CPU controller this process may use."""


@dataclass(frozen=True)
class Throttling:
    periods: int
    throttled: int
    throttled_s: float

    def since(self, before: Throttling) -> Throttling:
        return Throttling(self.periods - before.periods, self.throttled - before.throttled,
                          self.throttled_s - before.throttled_s)  # fmt: skip


class CpuQuota:
    """``with CpuQuota(pid, cores=0.25):`` ``pid`` runs under the quota; the cgroup is
    removed after (``pid`` moved back to the root cgroup when it still runs)."""

    def __init__(self, pid: int, cores: float, period_s: float = 0.01) -> None:
        if not 0.01 <= cores <= (os.cpu_count() or 1):
            raise QuotaUnavailable(f"{cores:g} cores is outside [0.01, {os.cpu_count()}]")
        self.pid, self.cores = pid, cores
        self.period_us = round(period_s * 1e6)
        self.quota_us = round(cores * self.period_us)
        if self.quota_us < 1000:
            raise QuotaUnavailable(f"{cores:g} of a {period_s * 1e3:g} ms period is under the kernel's 1 ms minimum")
        self.version, self.root = _controller()
        self.path = self.root / f"edgesplit-bench-{secrets.token_hex(4)}"

    def __enter__(self) -> CpuQuota:
        try:
            self.path.mkdir()
            if self.version == 2:
                (self.path / "cpu.max").write_text(f"{self.quota_us} {self.period_us}\n")
            else:
                (self.path / "cpu.cfs_period_us").write_text(f"{self.period_us}\n")
                (self.path / "cpu.cfs_quota_us").write_text(f"{self.quota_us}\n")
            (self.path / "cgroup.procs").write_text(f"{self.pid}\n")
        except OSError as error:
            self._remove()
            raise QuotaUnavailable(f"cannot put pid {self.pid} under a CPU quota in {self.path}: "
                                   f"{error.strerror or error}") from None  # fmt: skip
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:  # fmt: skip
        self._remove()

    def throttling(self) -> Throttling:
        """The kernel's counters of this cgroup (cpu.stat)."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line.strip())
        if self.version == 2:
            return Throttling(int(stat["nr_periods"]), int(stat["nr_throttled"]), int(stat["throttled_usec"]) / 1e6)
        return Throttling(int(stat["nr_periods"]), int(stat["nr_throttled"]), int(stat["throttled_time"]) / 1e9)

    def describe(self) -> str:
        control = "cpu.max" if self.version == 2 else "cpu.cfs_quota_us/cpu.cfs_period_us"
        return f"cgroup v{self.version} {control} = {self.quota_us} us per {self.period_us} us ({self.cores:g} core)"

    def _remove(self) -> None:
        if not self.path.exists():
            return
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                (self.root / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            pass
        try:
            self.path.rmdir()
        except OSError:
            pass


def _controller() -> tuple[int, Path]:
    """(cgroup version, the folder to make the child cgroup in)."""
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.is_file() and "cpu" in controllers.read_text().split():
        subtree = V2_ROOT / "cgroup.subtree_control"
        if "cpu" not in subtree.read_text().split():
            try:
                subtree.write_text("+cpu\n")
            except OSError as error:
                raise QuotaUnavailable(f"cannot enable the cpu controller in {subtree}: {error.strerror}") from None
        return 2, V2_ROOT
    if (V1_CPU / "cpu.cfs_quota_us").is_file():
        return 1, V1_CPU
    raise QuotaUnavailable("no cgroup CPU controller here (neither cgroup v2's cpu.max nor v1's cpu.cfs_quota_us)")
