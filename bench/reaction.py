"""The hand-made reaction case of issue #16, as a new user would try it.

`edgesplit up` (SmolLM2, the default topology) on a broker of its own, a client issuing
greedy requests back to back, then the link between the entry `car` and the node after
it in the plan falls to 50 kB/s + 50 ms both ways (`edgesplit emulate car --link
X:50k:0.05` and `emulate X --link car:50k:0.05`). Prints every decision after the fall
and the first commit's delay: from the moment the first end was shaped (the worker's own
log line), and from when both were.

    .venv/bin/python -m bench.reaction [--settle-s 25] [--after-s 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.broker import free_port

EDGESPLIT = str(Path(sys.executable).with_name("edgesplit"))
STAMP = "%Y-%m-%d %H:%M:%S,%f"


def lines(path: Path, pattern: str) -> list[tuple[dt.datetime, str]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            found.append((dt.datetime.strptime(line[:23], STAMP), line[24:].strip()))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle-s", type=float, default=25.0, help="serving before the fall")
    parser.add_argument("--after-s", type=float, default=30.0, help="watching after the fall")
    args = parser.parse_args()
    broker = f"mqtt://127.0.0.1:{free_port()}"
    run = Path(tempfile.mkdtemp(prefix="edgesplit-reaction-"))
    up_log = (run / "up.out").open("w")
    up = subprocess.Popen([EDGESPLIT, "up", "--broker", broker, "--run-dir", str(run)],
                          stdout=up_log, stderr=subprocess.STDOUT)  # fmt: skip
    client: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 300
        while "edgesplit ready" not in (run / "up.out").read_text() and time.monotonic() < deadline:
            if up.poll() is not None:
                raise SystemExit(f"edgesplit up exited: see {run / 'up.out'}")
            time.sleep(1)
        ready = next(line for line in (run / "up.out").read_text().splitlines() if "edgesplit ready" in line)
        hop = re.search(r"car\[0,\d+\) (\w+)\[", ready)
        if hop is None:
            raise SystemExit(f"no node after car in the plan: {ready}")
        print(ready)
        loop = (f"while true; do {EDGESPLIT} generate 'The capital of France is' --max-new-tokens 24 "
                f"--broker {broker} > /dev/null 2>&1; done")  # fmt: skip
        client = subprocess.Popen(["bash", "-c", loop], start_new_session=True)
        time.sleep(args.settle_s)
        node = hop.group(1)
        print(f"link car <-> {node} falls to 50 kB/s + 50 ms")
        subprocess.run([EDGESPLIT, "emulate", "car", "--link", f"{node}:50k:0.05", "--broker", broker], check=True)
        subprocess.run([EDGESPLIT, "emulate", node, "--link", "car:50k:0.05", "--broker", broker], check=True)
        time.sleep(args.after_s)
    finally:
        if client is not None:
            subprocess.run(["pkill", "-g", str(client.pid)], check=False)
        up.send_signal(2)
        up.wait(timeout=60)
    shaped = [t for log in (run / "car.log", run / f"{node}.log") for t, _ in lines(log, r"emulation 1:")]
    fell, both = min(shaped), max(shaped)
    for at, text in lines(run / "orchestrator.log", r"decision \d+ on"):
        if at >= fell:
            print(f"  +{(at - fell).total_seconds():6.2f} s  {text.split(': ', 1)[-1][:150]}")
    commits = [at for at, _ in lines(run / "broadcaster.log", r"CommitEpoch") if at >= fell]
    if not commits:
        print("no plan change committed after the fall")
        return 1
    print(f"first commit {(commits[0] - fell).total_seconds():.2f} s after the first end was shaped, "
          f"{(commits[0] - both).total_seconds():.2f} s after both; logs in {run}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
