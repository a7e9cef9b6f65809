"""Timestamp probes for the data plane, loaded into every process of a benchmark run.

Put this folder first on PYTHONPATH and name an output folder in ES_TRACE_DIR; each
Python process started then (the benchmark and its workers) writes one log of
CLOCK_MONOTONIC stamps (``time.perf_counter``, comparable across processes): paho's read
start, frame decode, handler start, frame encode, socket write done, and every compute
job's run and round trip. `analyze.py` turns the logs into per-hop parts:

    rm -rf /tmp/hops && mkdir /tmp/hops
    ES_TRACE_DIR=/tmp/hops PYTHONPATH=bench/hoptrace .venv/bin/python -m bench.transport \
        --tokens 24 --repeats 4 --workers 3 --rtt-samples 20
    .venv/bin/python bench/hoptrace/analyze.py /tmp/hops

The probes wrap functions by monkeypatching; they add a few microseconds per event.
Without ES_TRACE_DIR this file does nothing.
"""

import os
import sys
import time

_path = os.environ.get("ES_TRACE_DIR")
if _path:
    import atexit

    _f = open(os.path.join(_path, f"{os.getpid()}.log"), "w", buffering=1 << 16)
    _pc = time.perf_counter

    def rec(*parts):
        _f.write(" ".join(str(p) for p in parts) + "\n")

    _state = {"read": 0.0}

    def _target(header):
        # a result goes to the entry: no block target, only its kind
        return getattr(header, "target", header.kind)

    def _install():
        import paho.mqtt.client as pc

        orig_read = pc.Client.loop_read

        def loop_read(self, *a, **k):
            _state["read"] = _pc()
            return orig_read(self, *a, **k)

        pc.Client.loop_read = loop_read
        import shared.bus as sb

        orig_decode = sb.decode_frame

        def decode_frame(payload):
            t = _pc()
            h, arr = orig_decode(payload)
            rec(
                "rx",
                h.request_id,
                h.step,
                _target(h),
                f"{_state['read']:.6f}",
                f"{t:.6f}",
                f"{_pc():.6f}",
            )
            return h, arr

        sb.decode_frame = decode_frame
        import services.worker.dataplane as dp

        orig_on = dp.DataPlane.on_frame

        async def on_frame(self, frame, *args, **kwargs):  # keep every argument (trusted=)
            h = frame.header
            rec("h", h.request_id, h.step, _target(h), f"{_pc():.6f}")
            return await orig_on(self, frame, *args, **kwargs)

        dp.DataPlane.on_frame = on_frame
        import services.worker.frame_auth as fa  # frames are sealed (encoded) there

        orig_enc = fa.encode_frame

        def encode_frame(header, arr, *key):
            t = _pc()
            out = orig_enc(header, arr, *key)
            rec(
                "tx",
                header.request_id,
                header.step,
                _target(header),
                f"{t:.6f}",
                f"{_pc():.6f}",
            )
            return out

        fa.encode_frame = encode_frame
        import shared.fastpath as fp

        orig_pub = fp.FastPath.publish

        def publish_now(self, topic, payload, retain):
            t = _pc()
            orig_pub(self, topic, payload, retain)
            rec(
                "w", topic.rsplit("/", 2)[-2] if "/" in topic else topic, f"{_pc():.6f}", f"{t:.6f}"
            )

        fp.FastPath.publish = publish_now
        import services.worker.compute_thread as cm

        orig_run = cm.ComputeThread.run

        async def run(self, function, *args):
            name = getattr(function, "__name__", "?")

            def timed(*job_args):  # on the compute thread: the job itself, without its wait
                began = _pc()
                try:
                    return function(*job_args)
                finally:
                    rec("c", name, f"{began:.6f}", f"{_pc():.6f}")

            t = _pc()
            try:
                return await orig_run(self, timed, *args)
            finally:
                rec("cr", name, f"{t:.6f}", f"{_pc():.6f}")

        cm.ComputeThread.run = run

    try:
        sys.path.insert(0, os.getcwd())
        _install()
    except Exception as e:
        rec("install-failed", repr(e))

    def _flush(*a):
        _f.flush()

    atexit.register(_flush)
