"""`edgesplit up --metrics on|off`: a free Prometheus /metrics port for every process `up`
starts (each reads it from EDGESPLIT_METRICS_PORT, shared/metrics.py), recorded in
RUN/metrics-targets.json, a Prometheus file_sd target file
(deploy/prometheus/prometheus.yml reads it)."""

from __future__ import annotations

import json
from collections.abc import Iterable, MutableMapping
from pathlib import Path

from shared.ports import quiet_ports

METRICS_HOST = "127.0.0.1"
TARGETS_FILE = "metrics-targets.json"


def assign_metrics_ports(names: Iterable[str], environments: MutableMapping[str, dict[str, str]],
                         host: str = METRICS_HOST) -> dict[str, str]:  # fmt: skip
    """A distinct free port for each process name (below the kernel's ephemeral range, so
    no outgoing connection takes it before the process binds it: shared/ports.py), set as
    its EDGESPLIT_METRICS_PORT / _HOST in ``environments``; returns name -> "host:port"."""
    taken: set[int] = set()
    targets = {}
    for name in names:
        port = quiet_ports()
        while port in taken:
            port = quiet_ports()
        taken.add(port)
        environment = environments.setdefault(name, {})
        environment.update({"EDGESPLIT_METRICS_PORT": str(port), "EDGESPLIT_METRICS_HOST": host})
        targets[name] = f"{host}:{port}"
    return targets


def write_targets(run_dir: Path, targets: dict[str, str], cluster: str) -> Path:
    """RUN/metrics-targets.json: one file_sd group per process, labelled with its
    ``service`` (the name `up` knows it by) and ``cluster``."""
    groups = [{"targets": [address], "labels": {"service": name, "cluster": cluster}}
              for name, address in sorted(targets.items())]  # fmt: skip
    path = run_dir / TARGETS_FILE
    path.write_text(json.dumps(groups, indent=2) + "\n", encoding="utf-8")
    return path
