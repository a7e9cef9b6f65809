"""Idle resident memory of the four control services, for one or more source trees.

For each tree (``--tree PATH``, repeatable; default this checkout) and each control
service (monitor, orchestrator, split_reviser, broadcaster), starts ``python -m
services.X`` with the arguments ``edgesplit up`` gives it (services/cli/launcher.py),
run from that tree (cwd and PYTHONPATH = the tree), against a Mosquitto of its own on a
free port (the project's config, shared/broker.py). Once the service has run
``--settle-s``, holds a connection to the broker and its resident set has stopped moving
(2 s of readings within 1 %), it reads ``VmRSS`` and ``VmHWM`` from /proc/PID/status and
whether libtorch is mapped (/proc/PID/maps), stops the service and goes on. Services run
one at a time, so each reading is of a process alone on the machine; ``--rounds``
repeats the whole sweep and the table gives the median.

The shard store they read is a tiny llama (4 blocks), written once with this checkout's
CLI: ``python -m services.cli models tiny llama --out DIR`` then
``python -m services.cli shard DIR --out SHARDS``. The services' code, not the model,
decides their memory: none of them loads a weight.

    .venv/bin/python -m bench.service_memory --tree /work/wt-old --tree .
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shared.broker import start_local_broker
from shared.errors import EdgesplitError, ServingError
from shared.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("monitor", "orchestrator", "split_reviser", "broadcaster")
TOPOLOGY = Path("deploy/topologies/default.toml")  # relative to each tree
POLL_S = 0.25
STEADY_SAMPLES = 8  # 2 s of readings that must agree before the service counts as idle
STEADY_TOLERANCE = 0.01  # relative spread allowed among those readings
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reading:
    """One service of one tree, once idle. Memory in KiB, as /proc reports it."""

    service: str
    tree: str
    rss_kib: int
    peak_kib: int
    torch_mapped: bool
    idle_after_s: float


def make_shards(work_dir: Path) -> Path:
    """A tiny llama shard store under ``work_dir``, written by this checkout's CLI.
    Raises ServingError if either command fails."""
    model, shards = work_dir / "model", work_dir / "shards"
    for command in (["models", "tiny", "llama", "--out", str(model)],
                    ["shard", str(model), "--out", str(shards)]):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "services.cli", *command], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        if result.returncode != 0:
            raise ServingError(f"`edgesplit {' '.join(command)}` failed: {result.stderr.strip()[-500:]}")
    return shards


def service_arguments(service: str, shards: Path, tree: Path) -> list[str]:
    """The arguments services/cli/launcher.py starts ``service`` with (default topology)."""
    topology = load_topology(tree / TOPOLOGY)
    if service == "monitor":
        return ["--topology", str(tree / TOPOLOGY), "--shards", str(shards)]
    if service == "orchestrator":
        nodes = ",".join(node.id for node in topology.nodes)
        return ["--shards", str(shards), "--entry", topology.entry_node().id, "--expect-nodes", nodes,
                "--private-blocks", str(topology.private_blocks),
                "--trusted-level", str(topology.trusted_level)]  # fmt: skip
    return ["--shards", str(shards)]


def _status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])  # "123456 kB"
    return fields["VmRSS"], fields["VmHWM"]


def _broker_connections(pid: int, port: int) -> int:
    """Established TCP connections of ``pid`` to 127.0.0.1:``port`` (its sockets'
    inodes looked up in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # sl local rem st ... uid timeout inode
        if fields[2] == f"0100007F:{port:04X}" and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def _torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _log_tail(path: Path) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-5:])


def measure(service: str, tree: Path, shards: Path, log_dir: Path, settle_s: float,
            timeout_s: float) -> Reading:  # fmt: skip
    """Start ``service`` from ``tree`` against a broker of its own and read its memory
    once idle. Raises ServingError if it exits or is not idle within ``timeout_s``."""
    log_path = log_dir / f"{tree.name}-{service}.log"
    with start_local_broker() as broker, log_path.open("wb") as log:
        command = [sys.executable, "-m", f"services.{service}", *service_arguments(service, shards, tree),
                   "--broker", broker.url, "--cluster", "mem" + secrets.token_hex(4)]  # fmt: skip
        process = subprocess.Popen(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                                   stdout=log, stderr=log, start_new_session=True)  # fmt: skip
        started = time.monotonic()
        try:
            samples: list[int] = []
            while True:
                time.sleep(POLL_S)
                elapsed_s = time.monotonic() - started
                if process.poll() is not None:
                    raise ServingError(f"{tree}: services.{service} exited with {process.returncode}: "
                                       f"{_log_tail(log_path)}")  # fmt: skip
                samples = [*samples, _status_kib(process.pid)[0]][-STEADY_SAMPLES:]
                steady = len(samples) == STEADY_SAMPLES and max(samples) - min(samples) <= STEADY_TOLERANCE * max(samples)
                if elapsed_s >= settle_s and steady and _broker_connections(process.pid, broker.port):
                    rss_kib, peak_kib = _status_kib(process.pid)
                    return Reading(service, str(tree), rss_kib, peak_kib, _torch_mapped(process.pid), elapsed_s)
                if elapsed_s > timeout_s:
                    raise ServingError(f"{tree}: services.{service} not idle after {timeout_s:.0f} s "
                                       f"(resident KiB {samples}); see {log_path}")  # fmt: skip
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)


def _tree_label(tree: Path) -> str:
    result = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False)  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return f"{tree.name}@{result.stdout.strip() or '?'}{'+changes' if dirty else ''}"


def print_table(readings: list[Reading], labels: dict[str, str]) -> None:
    """Per service, the median over rounds of each tree's VmRSS (MiB), and libtorch."""
    trees = list(labels)
    header = f"{'service':<14}" + "".join(f"{labels[tree]:>30}" for tree in trees)
    print(header + ("   change" if len(trees) == 2 else ""))
    for service in SERVICES:
        medians = []
        cells = []
        for tree in trees:
            mine = [r for r in readings if r.service == service and r.tree == tree]
            rss_mib = statistics.median(r.rss_kib for r in mine) / 1024
            torch = "torch" if any(r.torch_mapped for r in mine) else "no torch"
            medians.append(rss_mib)
            cells.append(f"{rss_mib:8.1f} MiB ({torch})")
        change = f"   {medians[1] - medians[0]:+7.1f} MiB" if len(trees) == 2 else ""
        print(f"{service:<14}" + "".join(f"{cell:>30}" for cell in cells) + change)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, action="append",
                        help="source tree to run the services from (repeatable; default this checkout)")  # fmt: skip
    parser.add_argument("--settle-s", type=float, default=5.0, help="run at least this long before reading (default 5)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="give up on a service after (default 120)")
    parser.add_argument("--rounds", type=int, default=3, help="readings per service and tree; the median counts (default 3)")
    args = parser.parse_args(argv)
    trees = [tree.resolve() for tree in (args.tree or [ROOT])]
    labels = {str(tree): _tree_label(tree) for tree in trees}
    readings: list[Reading] = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgesplit-memory-") as work:
            shards = make_shards(Path(work))
            for round_index in range(args.rounds):
                for service in SERVICES:
                    for tree in trees:  # interleaved, so drift on the machine hits every tree alike
                        reading = measure(service, tree, shards, Path(work), args.settle_s, args.timeout_s)
                        readings.append(reading)
                        print(f"round {round_index + 1}: {labels[str(tree)]:<28} {service:<14} VmRSS "
                              f"{reading.rss_kib / 1024:7.1f} MiB  VmHWM {reading.peak_kib / 1024:7.1f} MiB  "
                              f"{'torch' if reading.torch_mapped else 'no torch'}  idle after "
                              f"{reading.idle_after_s:.1f} s", flush=True)  # fmt: skip
    except EdgesplitError as error:
        print(f"service_memory: {error}", file=sys.stderr)
        return 1
    print()
    print_table(readings, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
