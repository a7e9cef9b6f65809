"""llama.cpp for bench/peer.py: built from the llama-cpp-python source distribution on PyPI,
cached outside the repository, and driven through its own tools.

Benchmark-only: nothing here is imported by the services, and nothing it builds is
committed. The cache (``~/.cache/edgesplit-peer`` unless ``$EDGESPLIT_PEER_CACHE`` says
otherwise) holds the sdist, its source, one build folder per sdist version and the GGUF
files made with ``llama-quantize``; a second run reuses all of it.

- :func:`build` downloads (``pip download --no-deps --no-binary :all:``), unpacks and
  builds ``llama-bench``, ``llama-quantize`` and ``ggml-rpc-server`` with ``-DGGML_RPC=ON``
  (about 7 minutes on a 2-core machine);
- :func:`quantize` makes another precision of a GGUF (``--allow-requantize``);
- :class:`RpcServers` runs one-thread RPC servers on loopback;
- :func:`llama_bench` runs one token-generation test and :func:`parse_llama_bench`
  reads its JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import EdgesplitError

SDIST_PACKAGE = "llama-cpp-python"
DEFAULT_VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-quantize", "ggml-rpc-server")
CACHE_ENV = "EDGESPLIT_PEER_CACHE"
BUILD_TIMEOUT_S = 3600.0
BENCH_TIMEOUT_S = 600.0

Progress = Callable[[str], None]


class PeerError(EdgesplitError):
    """llama.cpp could not be fetched, built or run for the side-by-side benchmark."""


def default_cache() -> Path:
    """``$EDGESPLIT_PEER_CACHE`` if set, else ``~/.cache/edgesplit-peer`` (outside the repository)."""
    configured = os.environ.get(CACHE_ENV)
    return (
        Path(configured).expanduser() if configured else Path.home() / ".cache" / "edgesplit-peer"
    )


@dataclass(frozen=True)
class Tools:
    """Paths of the built llama.cpp tools."""

    bench: Path
    quantize: Path
    rpc_server: Path
    source: Path  # the llama.cpp source tree inside the sdist


def check_toolchain() -> None:
    """Raise PeerError naming what is missing (cmake, a C and a C++ compiler)."""
    missing = [name for name, candidates in (("cmake", ("cmake",)), ("a C compiler", ("cc", "gcc")),
                                             ("a C++ compiler", ("c++", "g++")))
               if not any(shutil.which(c) for c in candidates)]  # fmt: skip
    if missing:
        raise PeerError(f"cannot build llama.cpp: {', '.join(missing)} not found on PATH "
                        "(Debian: apt-get install cmake build-essential)")  # fmt: skip


def _run(command: Sequence[str], log: Path, what: str, timeout_s: float = BUILD_TIMEOUT_S) -> None:
    with open(log, "ab") as out:
        try:
            done = subprocess.run(
                list(command), stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PeerError(f"{what} failed: {error} (log {log})") from error
    if done.returncode != 0:
        raise PeerError(f"{what} failed with exit status {done.returncode}; see {log}")


def fetch_source(cache: Path, version: str, progress: Progress) -> Path:
    """The llama.cpp source tree of ``llama-cpp-python==version``'s sdist (downloaded and
    unpacked into ``cache`` once)."""
    unpacked = cache / "src" / f"llama_cpp_python-{version}"
    source = unpacked / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    sdist = cache / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        progress(f"downloading the {SDIST_PACKAGE}=={version} sdist from PyPI into {sdist.parent}")
        sdist.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--dest", str(sdist.parent), f"{SDIST_PACKAGE}=={version}"],
             cache / "download.log", "pip download")  # fmt: skip
        if not sdist.is_file():
            raise PeerError(f"pip download left no {sdist.name} in {sdist.parent}")
    progress(f"unpacking {sdist.name}")
    with tarfile.open(sdist) as archive:
        archive.extractall(cache / "src", filter="data")
    if not (source / "CMakeLists.txt").is_file():
        raise PeerError(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt")
    return source


BASE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=OFF",
)  # fmt: skip
CPU_FEATURES = {
    "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_BMI2": "bmi2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
    "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
}  # fmt: skip
"""ggml's x86 options and the /proc/cpuinfo flag each needs. GGML_NATIVE would compile in
AMX, which these CPUs list but their VMs do not enable: any batch over one row (a prompt)
died with SIGILL in tinygemm_kernel_amx (tilezero). So the features by name, AMX left
out, each only where this CPU lists it: a fixed list named AVX-VNNI, which an AMD EPYC
machine here lacks, and llama-bench died with SIGILL (2026-12-07)."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty when unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cmake_options(flags: set[str] | None = None) -> tuple[str, ...]:
    """The configure options: BASE_OPTIONS and each CPU_FEATURES option ON or OFF by ``flags``."""
    flags = cpu_flags() if flags is None else flags
    return (*BASE_OPTIONS, *(f"-D{option}={'ON' if flag in flags else 'OFF'}" for option, flag in CPU_FEATURES.items()))


STAMP = "edgesplit-peer.options"  # in the build folder: the options it was configured with


def build(cache: Path | None = None, version: str = DEFAULT_VERSION,
          progress: Progress = print) -> Tools:  # fmt: skip
    """Build (once; again only when cmake_options() change) and return llama.cpp's tools.
    Raises PeerError when the toolchain is missing or a step fails (its log is named)."""
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    build_dir = cache / f"build-{version}"
    bin_dir, stamp = build_dir / "bin", build_dir / STAMP
    source = cache / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    configure = cmake_options()
    options = "\n".join(configure)
    built = all((bin_dir / tool).is_file() for tool in TOOLS) and source.is_dir()
    if built and stamp.is_file() and stamp.read_text() == options:
        progress(f"reusing the llama.cpp build in {build_dir}")
    else:
        check_toolchain()
        source = fetch_source(cache, version, progress)
        log = cache / f"build-{version}.log"
        started = time.monotonic()
        progress(f"building llama.cpp ({', '.join(TOOLS)}) in {build_dir}: minutes; log {log}")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *generator, *configure],
             log, "cmake configure")  # fmt: skip
        _run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1), "--target", *TOOLS],
             log, "cmake build")  # fmt: skip
        stamp.write_text(options)
        progress(f"built llama.cpp in {time.monotonic() - started:.0f} s")
    bench, quantize_tool = bin_dir / "llama-bench", bin_dir / "llama-quantize"
    return Tools(bench, quantize_tool, bin_dir / "ggml-rpc-server", source)


def quantize(
    tools: Tools, source: Path, kind: str, out_dir: Path, progress: Progress = print
) -> Path:
    """``source`` re-quantised to ``kind`` (Q8_0, F32, ...) with llama-quantize, made once."""
    out = out_dir / f"{source.stem.split('.')[0]}.{kind}.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"llama-quantize --allow-requantize {source.name} -> {out.name}")
    partial = out.with_suffix(".partial")
    _run([str(tools.quantize), "--allow-requantize", str(source), str(partial), kind],
         out_dir / "quantize.log", f"llama-quantize to {kind}", timeout_s=BENCH_TIMEOUT_S)  # fmt: skip
    partial.replace(out)
    return out


@dataclass(frozen=True)
class BenchResult:
    """One llama-bench test: its model type, threads, tokens generated and the time of
    each repetition (ns, the whole generation)."""

    model_type: str
    n_threads: int
    n_gen: int
    n_depth: int
    samples_ns: tuple[int, ...]
    backends: str  # "CPU" locally, "RPC" with the layers on RPC servers

    @property
    def ms_per_token(self) -> float:
        """Median repetition's time per generated token, ms."""
        return statistics.median(self.samples_ns) / self.n_gen / 1e6


def parse_llama_bench(text: str) -> list[BenchResult]:
    """The token-generation tests in llama-bench's ``-o jsonl`` output (prompt-only tests
    are skipped). Raises PeerError for a line that is not a test record."""
    results = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            result = BenchResult(str(record["model_type"]), int(record["n_threads"]), int(record["n_gen"]),
                                 int(record.get("n_depth", 0)), tuple(int(s) for s in record["samples_ns"]),
                                 str(record.get("backends", "")))  # fmt: skip
        except (ValueError, KeyError, TypeError) as error:
            raise PeerError(
                f"llama-bench output line {number} is not a test record: {line[:120]!r}"
            ) from error
        if result.n_gen > 0 and result.samples_ns:
            results.append(result)
    return results


async def llama_bench(tools: Tools, model: Path, tokens: int, depth: int, threads: int = 1,
                      rpc: Sequence[str] = (), repetitions: int = 1) -> BenchResult:  # fmt: skip
    """One llama-bench token-generation test (``-p 0 -n tokens -d depth``), locally or with
    the layers on the RPC servers ``rpc`` (host:port). Raises PeerError on failure."""
    command = [str(tools.bench), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
               "-d", str(depth), "-r", str(repetitions), "-o", "jsonl"]  # fmt: skip
    if rpc:
        command += ["--rpc", ",".join(rpc)]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(BENCH_TIMEOUT_S):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise PeerError(f"llama-bench on {model.name} took over {BENCH_TIMEOUT_S:.0f} s") from None
    if process.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise PeerError(
            f"llama-bench on {model.name} exited {process.returncode}: {' | '.join(tail)}"
        )
    results = parse_llama_bench(stdout.decode())
    if len(results) != 1:
        raise PeerError(f"llama-bench on {model.name} gave {len(results)} generation tests, not 1")
    wanted = "RPC" if rpc else "CPU"
    if wanted not in results[0].backends.split(","):
        raise PeerError(f"llama-bench on {model.name} ran on {results[0].backends!r}, not {wanted}")
    return results[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RpcServers:
    """``count`` llama.cpp RPC servers on loopback, ``threads`` each; a context manager."""

    def __init__(self, tools: Tools, count: int, log_dir: Path, threads: int = 1) -> None:
        self.tools, self.count, self.log_dir, self.threads = tools, count, log_dir, threads
        self.processes: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []

    def __enter__(self) -> RpcServers:
        try:
            for index in range(self.count):
                port = free_port()
                with open(self.log_dir / f"rpc-server-{index}.log", "ab") as log:
                    self.processes.append(subprocess.Popen(
                        [str(self.tools.rpc_server), "-H", "127.0.0.1", "-p", str(port), "-t", str(self.threads)],
                        stdout=log, stderr=log, start_new_session=True))  # fmt: skip
                self.endpoints.append(f"127.0.0.1:{port}")
            for endpoint, process in zip(self.endpoints, self.processes, strict=True):
                wait_listening(endpoint, process, timeout_s=30.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_listening(endpoint: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Return once ``endpoint`` accepts TCP connections; PeerError if the server exits or
    does not listen within ``timeout_s``."""
    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"rpc-server for {endpoint} exited with status {process.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise PeerError(f"rpc-server at {endpoint} not listening after {timeout_s:.0f} s")
