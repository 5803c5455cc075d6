"""Overload: what an overloaded server answers, and how fast (127.0.0.1 only).

1. Capacity: closed loop, `--clients` concurrent callers of Explain for `--duration` s: answers/s.
2. Open loop at 2x and 5x that rate for `--duration` s each: every call gets a deadline; the server
   must refuse what it cannot take with RESOURCE_EXHAUSTED at once (admission: max_inflight) and
   keep its cores on the calls it accepted. Printed per load:
   - refusal latency p50 / p99 (goal p99 <= 5 ms),
   - goodput / capacity: answers/s during the window vs the capacity of part 1 (goal >= 0.9 at 2x),
   - latency of the answered calls, other statuses (deadline, unavailable),
   - taken/s: the calls that reached the server's code (everything but grpc's CANCELLED sheds): how
     fast the event loop takes calls from grpc (docs/ARCHITECTURE.md "Overload": when the loop is
     the bound this stays near the capacity, and refusals wait in grpc's queue before they happen),
   - the client's own event-loop lag (p99 of how late a 1 ms timer fires): how much of a latency can
     be the client's, and
   - the server's resident memory before, at the peak sampled, and after (growth).

The server is a separate `xaiserve serve` process on this machine, on the tiny test models
(tiny-nemu by default: the server's per-call work, not the model, bounds the capacity, the worst
case for refusals; --model slow-nemu --size 64 makes the model the bound); the client is one asyncio
process sending pre-serialised requests. Calls that grpc itself cancels before the server's code
sees them (beyond max_pending_calls, when the event loop falls behind) are counted as "shed". On
a shared 2-core machine the client's own CPU competes with the server's: the figures are for this
machine at its load (printed), measured in one run.

With `--processes 1,2` the server runs as a group of that many processes on one port
(`xaiserve serve --processes N`, service/supervisor.py), one after the other in each of `--rounds`
rounds (interleaved); RSS is then the sum over the supervisor and its children. The client spreads
its calls over `--channels` connections (the kernel gives each connection to one process).

`--store model_store --model scenes-nemu --size 64` runs it on a served default model instead (the
model's own cost then bounds the capacity, as with users' models). `--server-cpus 0 --client-cpus 1`
pins the server (all its processes and threads) and the client to separate cores, so that neither's
work is counted in the other's latency (on 2 cores: the server gets one).

    python bench/bench_overload.py [--duration 8] [--model tiny-nemu] [--max-inflight 64]
                                   [--processes 1,2] [--rounds 1] [--channels 8]
                                   [--store DIR] [--server-cpus 0 --client-cpus 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from xaiserve.paths import checkout_root

ROOT = checkout_root()
sys.path.insert(0, str(ROOT))
from tests.serverutil import server_process  # noqa: E402
from tests.tiny_models import build_store  # noqa: E402
from xaiserve.proto.explain.v1 import explainer_pb2 as pb  # noqa: E402

METHOD = "/explain.v1.Explainer/Explain"


def _rss_one(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except FileNotFoundError:
        return 0.0
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def rss_mb(pid: int) -> float:
    """Resident memory of the server: the process and its children (a --processes group)."""
    return _rss_one(pid) + sum(_rss_one(c) for c in _children(pid))


class RssSampler:
    def __init__(self, pid: int):
        self.pid, self.peak = pid, rss_mb(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> "RssSampler":
        self.before = rss_mb(self.pid)
        self.peak = self.before
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.after = rss_mb(self.pid)


def request_bytes(model: str, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return pb.ExplainRequest(model=model, image=pb.Image(encoded=buf.getvalue())).SerializeToString()


CHANNELS = 8  # client connections (--channels): a --processes group gets connections, not calls


def open_calls(address: str) -> tuple[list[grpc.aio.Channel], list]:
    # a local subchannel pool: every channel its own connection (else grpc shares one)
    chans = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)
    ]
    return chans, [ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None) for ch in chans]


async def capacity(address: str, req: bytes, clients: int, duration: float) -> float:
    chans, calls = open_calls(address)
    try:
        for i in range(20 * len(calls)):
            await calls[i % len(calls)](req, timeout=30)
        done = 0
        end = time.perf_counter() + duration

        async def worker(call):
            nonlocal done
            while time.perf_counter() < end:
                await call(req, timeout=30)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(clients)))
        return done / (time.perf_counter() - t0)
    finally:
        for ch in chans:
            await ch.close()


async def offered(address: str, req: bytes, rate: float, duration: float, deadline: float) -> dict:
    """Send at `rate` per second for `duration` s (open loop); returns what came back."""
    results: list[tuple[float, float, str]] = []  # (sent, took, status)
    seen: dict[str, str] = {}  # first message of each unexpected status
    lags: list[float] = []  # the client's own event-loop lag: how late a 1 ms timer fires
    sending = True

    async def ticker() -> None:  # is the client itself the bottleneck? (it shares the cores)
        while sending:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    chans, calls = open_calls(address)
    try:
        for i in range(2 * len(calls)):  # connect every channel before the clock starts
            await calls[i % len(calls)](req, timeout=30)

        async def one(sent: float, call) -> None:
            try:
                await call(req, timeout=deadline)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                if code not in ("RESOURCE_EXHAUSTED",) and code not in seen:
                    seen[code] = e.details()
            results.append((sent, time.perf_counter() - sent, code))

        tasks = []
        tick = asyncio.ensure_future(ticker())
        t0 = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(time.perf_counter(), calls[i % len(calls)])))
        sent_for = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        sending = False
        await tick
    finally:
        for ch in chans:
            await ch.close()
    window_end = t0 + duration
    ok_in_window = sum(1 for s, d, c in results if c == "OK" and s + d <= window_end)
    return {
        "results": results,
        "sent_rate": n / sent_for,
        "goodput": ok_in_window / duration,
        "seen": seen,
        "client_lag": lags,
    }


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    ap.add_argument("--model", default="tiny-nemu")
    ap.add_argument("--size", type=int, default=32, help="side of the (random, PNG) images sent")
    ap.add_argument("--clients", type=int, default=64, help="closed-loop callers measuring capacity")
    ap.add_argument("--max-inflight", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=10.0, help="per-call deadline (s) in the open loop")
    ap.add_argument("--processes", default="1", help="comma-separated server process counts, e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over --processes (interleaved)")
    ap.add_argument("--channels", type=int, default=8, help="client connections")
    ap.add_argument("--store", default="", help="a model store to serve (default: the tiny test models, built here)")
    ap.add_argument("--server-cpus", default="", help="cores for the server, e.g. 0 (default: all)")
    ap.add_argument("--client-cpus", default="", help="cores for this client, e.g. 1 (default: all)")
    args = ap.parse_args()
    global CHANNELS
    CHANNELS = args.channels
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else build_store(Path(tmp) / "store")
        for rnd in range(args.rounds):
            for n in [int(x) for x in args.processes.split(",")]:
                print(f"\n##### round {rnd + 1}/{args.rounds}: --processes {n}, {args.channels} client connections")
                one_server(args, store, Path(tmp), n)


def _serving(url: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("xaiserve_server_processes "):
                return float(line.split()[1])
    return 0.0


def _cpus(text: str) -> set[int]:
    return {int(x) for x in text.split(",")} if text else set(range(os.cpu_count() or 1))


@contextlib.contextmanager
def _pinned_server(args, store: Path, tmp: Path, n: int) -> Iterator:
    """The server on --server-cpus (a process inherits the cores of the thread that starts it, and
    its threads and children theirs), then this thread on --client-cpus."""
    with contextlib.ExitStack() as stack:
        os.sched_setaffinity(0, _cpus(args.server_cpus))
        try:
            srv = stack.enter_context(
                server_process(
                    store,
                    state_dir=tmp / "state",
                    job_workers=0,
                    max_inflight=args.max_inflight,
                    host="127.0.0.1",
                    processes=n,
                )
            )
        finally:
            os.sched_setaffinity(0, _cpus(args.client_cpus))
        yield srv


def one_server(args, store: Path, tmp: Path, n: int) -> None:
    with _pinned_server(args, store, tmp, n) as srv:
        end = time.time() + 120
        while _serving(srv.metrics_url) < n and time.time() < end:  # every process of the group serving
            time.sleep(0.2)
        pid = srv.process.pid
        req = request_bytes(args.model, args.size)
        with RssSampler(pid) as mem0:
            cap = asyncio.run(capacity(srv.address, req, args.clients, args.duration))
        pins = f"; server on cores {args.server_cpus or 'all'}, client on {args.client_cpus or 'all'}"
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores{pins}")
        print(
            f"== capacity ({args.model}, {args.size} x {args.size} PNG, {args.clients} closed-loop clients, "
            f"max_inflight {args.max_inflight}): {cap:.1f} answers/s; RSS {mem0.before:.0f} -> {mem0.after:.0f} MB"
        )
        print(
            f"{'load':>5} {'sent/s':>8} {'answers/s':>10} {'goodput/cap':>12} {'refused':>8} {'refusal p50':>12} "
            f"{'refusal p99':>12} {'shed':>7} {'shed p50':>11} {'shed p99':>11} {'answer p50':>11} {'answer p99':>11} "
            f"{'other':>8} {'taken/s':>8} {'client lag p99':>15} {'RSS before/peak/after MB':>26}"
        )
        print(
            "(refused: RESOURCE_EXHAUSTED from admission; shed: CANCELLED by grpc beyond max_pending_calls; "
            "taken/s: calls that reached the server's code (all but shed), the rate its event loop takes calls "
            "from grpc; client lag: how late the bench client's own 1 ms timer fired, a bound on how much of a "
            "latency is the client's)"
        )
        for k in (2, 5):
            with RssSampler(pid) as mem:
                r = asyncio.run(offered(srv.address, req, k * cap, args.duration, args.deadline))
            res = r["results"]
            refused = [d for _, d, c in res if c == "RESOURCE_EXHAUSTED"]
            shed = [d for _, d, c in res if c == "CANCELLED"]  # grpc's own refusals (max_pending_calls)
            answered = [d for _, d, c in res if c == "OK"]
            other: dict[str, int] = {}
            for _, _, c in res:
                if c not in ("OK", "RESOURCE_EXHAUSTED"):
                    other[c] = other.get(c, 0) + 1
            ratio = r["goodput"] / cap
            goal = " (goal p99 <= 5 ms" + (", goodput >= 0.9)" if k == 2 else ")")
            other.pop("CANCELLED", None)
            taken = (len(res) - len(shed)) / args.duration
            print(
                f"{k:>4}x {r['sent_rate']:8.1f} {r['goodput']:10.1f} {ratio:12.2f} {len(refused):8d} "
                f"{pct(refused, 50):10.2f}ms {pct(refused, 99):10.2f}ms {len(shed):7d} {pct(shed, 50):9.2f}ms {pct(shed, 99):9.2f}ms "
                f"{pct(answered, 50):9.1f}ms {pct(answered, 99):9.1f}ms "
                f"{str(other or '-'):>8} {taken:8.1f} {pct(r['client_lag'], 99):13.2f}ms "
                f"{mem.before:8.0f}/{mem.peak:.0f}/{mem.after:.0f}{goal}"
            )


if __name__ == "__main__":
    main()
