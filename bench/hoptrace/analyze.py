"""Per-hop parts from the logs of bench/hoptrace/sitecustomize.py (see its docstring).

Prints, for decode steps (step >= 2), per hop target block: encode, send (encode start ->
bytes written), read -> decode, decode, decode -> handler, and the whole hop (encode
start -> handler start) as p50 / p10; and each process's compute jobs: ``c`` the job on
the compute thread, ``cr`` the round trip seen from the event loop.
"""

import glob
import os
import statistics as st
import sys
from collections import defaultdict

d = sys.argv[1]
ev = defaultdict(dict)  # (rid, step, target) -> {name: (pid, t)}
comp = defaultdict(list)
for path in glob.glob(os.path.join(d, "*.log")):
    pid = os.path.basename(path)[:-4]
    lines = open(path).read().split("\n")
    last_tx = None
    for line in lines:
        p = line.split()
        if not p:
            continue
        if p[0] == "tx":
            key = (p[1], p[2], p[3])
            ev[key]["tx"] = (pid, float(p[4]))
            ev[key]["txe"] = (pid, float(p[5]))
            last_tx = key
        elif p[0] == "w" and last_tx:
            ev[last_tx].setdefault("w", (pid, float(p[2])))
            ev[last_tx].setdefault("ps", (pid, float(p[3])))
            last_tx = None
        elif p[0] == "rx":
            key = (p[1], p[2], p[3])
            ev[key]["read"] = (pid, float(p[4]))
            ev[key]["dec"] = (pid, float(p[5]))
            ev[key]["decd"] = (pid, float(p[6]))
        elif p[0] == "h":
            key = (p[1], p[2], p[3])
            ev[key]["h"] = (pid, float(p[4]))
        elif p[0] in ("c", "cr"):
            comp[(pid, p[0], p[1])].append(float(p[3]) - float(p[2]))
parts = defaultdict(list)
for key, e in ev.items():
    if int(key[1]) < 2 or key[2] in ("None",):
        continue
    if all(k in e for k in ("tx", "w", "read", "dec", "h")):
        parts[("tx->w", key[2])].append(e["w"][1] - e["tx"][1])
        parts[("enc", key[2])].append(e["txe"][1] - e["tx"][1])
        parts[("txe->pub", key[2])].append(e["ps"][1] - e["txe"][1])
        parts[("pub", key[2])].append(e["w"][1] - e["ps"][1])
        parts[("w->read", key[2])].append(e["read"][1] - e["w"][1])
        parts[("read->dec", key[2])].append(e["dec"][1] - e["read"][1])
        parts[("dec", key[2])].append(e["decd"][1] - e["dec"][1])
        parts[("decd->h", key[2])].append(e["h"][1] - e["decd"][1])
        parts[("tx->h", key[2])].append(e["h"][1] - e["tx"][1])
for k in sorted(parts):
    v = parts[k]
    print(
        f"{k[0]:10} target {k[1]:>3}  n={len(v):4} p50 {st.median(v) * 1e3:7.3f} p10 {sorted(v)[len(v) // 10] * 1e3:7.3f} ms"
    )
for k in sorted(comp):
    v = comp[k]
    print(
        f"{k}  n={len(v)} p50 {st.median(v) * 1e3:.3f} ms  p10 {sorted(v)[len(v) // 10] * 1e3:.3f}"
    )
