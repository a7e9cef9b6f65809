"""Link trace CSV files for ``link_trace`` events: ``t_s,bandwidth_bytes_per_s[,latency_s]``
(spec.py turns the rows into ``TracePoint``s)."""

from __future__ import annotations

import math
from pathlib import Path

from services.cli.scenarios.spec_fields import ScenarioError

TraceRow = tuple[float, float, float | None]  # t_s, bandwidth_bytes_per_s, latency_s


def read_trace(file: Path, key: str) -> tuple[TraceRow, ...]:
    """Parse a link trace CSV: ``t_s,bandwidth_bytes_per_s[,latency_s]`` per line.

    An optional header line (a first line whose first field is not a number) and blank
    lines are skipped; t_s must be >= 0 and strictly ascending, bandwidth > 0, latency >= 0,
    all finite. Raises ScenarioError naming ``key``, the file and the line.
    """
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{key}: cannot read {file} ({' '.join(str(error).split())})") from None
    points: list[TraceRow] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if not points and number == _first_content_line(lines) and not _is_number(cells[0]):
            continue  # the header
        point = _trace_point(cells, f"{key}: {file} line {number}")
        if points and point[0] <= points[-1][0]:
            raise ScenarioError(f"{key}: {file} line {number}: t_s must be ascending "
                                f"(got {point[0]:g} after {points[-1][0]:g})")  # fmt: skip
        points.append(point)
    if not points:
        raise ScenarioError(f"{key}: {file} has no rows (t_s,bandwidth_bytes_per_s[,latency_s])")
    return tuple(points)


def _trace_point(cells: list[str], where: str) -> TraceRow:
    if len(cells) not in (2, 3):
        raise ScenarioError(f"{where}: expected t_s,bandwidth_bytes_per_s[,latency_s] "
                            f"(got {len(cells)} fields)")  # fmt: skip
    names = ("t_s", "bandwidth_bytes_per_s", "latency_s")
    values: list[float] = []
    for name, cell in zip(names, cells, strict=False):
        if not _is_number(cell) or not math.isfinite(float(cell)):
            raise ScenarioError(f"{where}: {name} must be a finite number (got {cell!r})")
        values.append(float(cell))
    if values[0] < 0:
        raise ScenarioError(f"{where}: t_s must be >= 0 (got {values[0]:g})")
    if values[1] <= 0:
        raise ScenarioError(f"{where}: bandwidth_bytes_per_s must be > 0 (got {values[1]:g})")
    if len(values) == 3 and values[2] < 0:
        raise ScenarioError(f"{where}: latency_s must be >= 0 (got {values[2]:g})")
    return values[0], values[1], (values[2] if len(values) == 3 else None)


def _first_content_line(lines: list[str]) -> int:
    return next((number for number, line in enumerate(lines, start=1) if line.strip()), 0)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
