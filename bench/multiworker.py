"""fpy3-master with 1 and 2 workers, then load under repeated SIGHUP (see bench/README.md).

Part 1 measures HTTP/1.1 over TLS (wrk) and HTTP/3 (h3load) against ``fpy3-master`` with
``workers.count = 1`` and then 2, in the same run, and prints req/s, p99, the CPU % of the
master's whole process tree and the 2-worker / 1-worker ratio.

Part 2 runs 2 workers and, for each protocol separately, loads the server for
``--reload-duration`` seconds while sending SIGHUP to the master every ``--hup-every``
seconds, and reports requests done and failed (the goal is 0 failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run  # bench/run.py, next to this file
from run import H3LOAD, MODES, BenchError, LoadOpts, Mode, Tls

MODE_NAMES = ("https", "h3")


def write_config(tmp: Path, tls: Tls, port: int, workers: int, engine: str) -> Path:
    path = tmp / f"fpy3-{workers}w.toml"
    path.write_text(
        "[server]\n"
        f'app = "{run.APP}"\n'
        f'app_dir = "{run.ROOT.as_posix()}"\n'
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        "http_port = 0\n"
        f'state_dir = "{(tmp / "state").as_posix()}"\n'
        "\n[tls]\n"
        f'cert = "{Path(tls.cert).as_posix()}"\n'
        f'key = "{Path(tls.key).as_posix()}"\n'
        f'\n[http3]\nenabled = true\nengine = "{engine}"\n'
        '\n[logging]\naccess_log = false\nlevel = "warning"\n'
        f"\n[workers]\ncount = {workers}\n"
    )
    return path


class Master:
    """One fpy3-master process, started ready to serve https and h3."""

    def __init__(self, tmp: Path, tls: Tls, workers: int, start_timeout: float, engine: str):
        self.port = run.free_port()
        self.config = write_config(tmp, tls, self.port, workers, engine)
        self.argv = [run.tool("fpy3-master"), "--config", str(self.config)]
        self.log = tmp / f"master-{workers}w.log"
        pythonpath = os.pathsep.join(filter(None, [str(run.ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=run.ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        try:
            deadline = time.monotonic() + start_timeout
            for name in MODE_NAMES:
                run.wait_ready(self.proc, self.log, MODES[name], self.url, deadline)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"master died (exit {self.proc.returncode}): {run.log_reason(self.log)}"
            )

    def stop(self) -> None:
        run.stop(self.proc, timeout=40.0)  # workers.drain_timeout is 30 s


@dataclasses.dataclass
class Measured:
    result: run.LoadResult | None = None
    cpu_pct: float | None = None
    failed: str | None = None


def measure(master: Master, mode: Mode, opts: LoadOpts, warmup: float) -> Measured:
    try:
        if warmup > 0:
            mode.loadgen.run(master.url, dataclasses.replace(opts, duration=warmup))
        before, t0 = run.cpu_seconds(master.proc.pid), time.monotonic()
        result = mode.loadgen.run(master.url, opts)
        after, t1 = run.cpu_seconds(master.proc.pid), time.monotonic()
        master.check_alive()
    except BenchError as e:
        return Measured(failed=str(e))
    used = sum(v - before.get(pid, 0.0) for pid, v in after.items())
    return Measured(result, 100.0 * used / (t1 - t0))


# --- reload under load --------------------------------------------------------------


@dataclasses.dataclass
class ReloadResult:
    mode: str
    done: int = 0
    failed: int = 0
    detail: str = ""
    hups: int = 0


def run_with_hups(argv: list[str], master: Master, secs: float, every: float):
    """Run a load generator for ``secs`` while sending SIGHUP to the master every ``every`` s."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hups = 0
    start = time.monotonic()
    next_hup = start + every
    try:
        while p.poll() is None and time.monotonic() < start + secs + 30:
            now = time.monotonic()
            if now >= next_hup and now < start + secs:
                master.check_alive()
                master.proc.send_signal(signal.SIGHUP)
                hups += 1
                next_hup += every
            try:
                p.wait(timeout=max(0.01, min(next_hup, start + secs + 30) - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if p.poll() is None:
            p.kill()
            p.wait()
            raise BenchError(f"{Path(argv[0]).name} did not finish within {secs + 30:.0f}s")
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out, err, hups


def reload_wrk(master: Master, opts: LoadOpts, secs: float, every: float) -> ReloadResult:
    argv = run.Wrk().argv(master.url, dataclasses.replace(opts, duration=secs))
    rc, out, err, hups = run_with_hups(argv, master, secs, every)
    res = ReloadResult("https (wrk)", hups=hups)
    if rc != 0:
        raise BenchError(f"wrk exited {rc}: {run.tail(err or out)}")
    lr = run.parse_wrk(out)
    res.done, res.failed = lr.requests, sum(lr.errors.values())
    res.detail = run.fmt_errors(lr.errors) or "no errors"
    return res


def reload_h3(master: Master, opts: LoadOpts, secs: float, every: float) -> ReloadResult:
    argv = H3LOAD.cmd(master.url, opts.h3_connections, opts.h3_streams, opts.h3_threads, secs)
    rc, out, err, hups = run_with_hups(argv, master, secs, every)
    res = ReloadResult("h3 (h3load)", hups=hups)
    try:
        d = json.loads(out)
    except ValueError:
        raise BenchError(f"h3load exited {rc}: {run.tail(err or out)}") from None
    res.done, res.failed = d["requests"], d["errors"]
    kinds = ("errors_transfer", "errors_status", "errors_body", "errors_proto")
    parts = [f"{k.removeprefix('errors_')}: {d[k]}" for k in kinds if d[k]]
    if d["first_error"]:
        parts.append(f"first error: {d['first_error']}")
    parts.append(f"connects: {d['connects']}")
    if d["aborted"]:
        parts.append("aborted")
    res.detail = "; ".join(parts)
    return res


# --- main ---------------------------------------------------------------------------


def fmt_row(workers: int, mode: str, m: Measured, base: Measured | None) -> str:
    if not m.result:
        return f"| {mode} | {workers} | — | — | — | — | {run.cell('failed: ' + (m.failed or ''))} |"
    r = m.result
    ratio = run.ratio(r.rps, base.result.rps) if base and base.result else "—"
    notes = run.cell("; ".join(filter(None, [run.fmt_errors(r.errors), *r.notes])))
    return (
        f"| {mode} | {workers} | {r.rps:,.0f} | {r.p99_ms:.2f} ms | {m.cpu_pct:.0f}%"
        f" | {ratio} | {notes} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument(
        "--reload-duration", type=float, default=30.0, help="seconds of load under SIGHUP"
    )
    ap.add_argument("--hup-every", type=float, default=2.0, help="seconds between SIGHUPs")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before a run")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--quick", action="store_true", help="3 s measured runs, 10 s under SIGHUP")
    # Named, never "auto": the table measures the engine it says.
    ap.add_argument("--engine", choices=("ngtcp2", "msquic"), default="ngtcp2")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.reload_duration = 3.0, 10.0
    opts = LoadOpts(args.duration, connections=64, threads=2, cpus=None)
    H3LOAD.build()
    if H3LOAD.build_error:
        print(H3LOAD.build_error, file=sys.stderr)
        return 1
    for name in MODE_NAMES:
        if why := MODES[name].loadgen.missing():
            print(why, file=sys.stderr)
            return 1

    print(f"# fpy3-master: 1 vs 2 workers, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    print(f"- command: `{shlex.join(sys.orig_argv)}`")
    cpus = len(os.sched_getaffinity(0))
    print(f"- machine: {os.cpu_count()} cores ({cpus} usable), {run.cpu_model()}")
    print(f"- HTTP/3 engine: {args.engine}")
    print(
        f"- load: `{shlex.join(MODES['https'].loadgen.argv('URL', opts))}`,"
        f" `{shlex.join(MODES['h3'].loadgen.argv('URL', opts)).replace(str(run.ROOT) + '/', '')}`;"
        f" warmup {args.warmup:g} s"
    )
    rows: list[str] = []
    reloads: list[ReloadResult | str] = []
    master_argv = ""
    with tempfile.TemporaryDirectory(prefix="fpy3-mw-") as tmpdir:
        tmp = Path(tmpdir)
        tls = run.make_cert(tmp)
        results: dict[tuple[str, int], Measured] = {}
        for workers in (1, 2):
            print(f"... {workers} worker(s)", file=sys.stderr, flush=True)
            try:
                master = Master(tmp, tls, workers, args.start_timeout, args.engine)
            except BenchError as e:
                for name in MODE_NAMES:
                    results[name, workers] = Measured(failed=f"start: {e}")
                continue
            master_argv = shlex.join(master.argv)
            try:
                for name in MODE_NAMES:
                    print(f"    {name}", file=sys.stderr, flush=True)
                    results[name, workers] = measure(master, MODES[name], opts, args.warmup)
                if workers == 2:
                    for label, fn in (("https", reload_wrk), ("h3", reload_h3)):
                        print(f"    {label} under SIGHUP", file=sys.stderr, flush=True)
                        try:
                            reloads.append(fn(master, opts, args.reload_duration, args.hup_every))
                            master.check_alive()
                        except BenchError as e:
                            reloads.append(f"{label}: failed: {e}")
            finally:
                master.stop()
        for name in MODE_NAMES:
            for workers in (1, 2):
                base = results.get((name, 1)) if workers == 2 else None
                rows.append(fmt_row(workers, name, results[name, workers], base))

    print("\n| mode | workers | req/s | p99 | server CPU % | 2w ÷ 1w req/s | notes |")
    print("|---|--:|--:|--:|--:|--:|---|")
    print("\n".join(rows))
    print(
        "\nserver CPU %: user+system CPU time of the master and all its workers over the"
        " measured run ÷ wall time (100% = one core)."
    )
    print(
        f"\n## Under SIGHUP every {args.hup_every:g} s ({args.reload_duration:g} s of load,"
        " 2 workers)\n"
    )
    print("| load | SIGHUPs sent | requests done | failed | detail |")
    print("|---|--:|--:|--:|---|")
    ok = True
    for r in reloads:
        if isinstance(r, str):
            print(f"| {run.cell(r)} | — | — | — | — |")
            ok = False
            continue
        ok &= r.failed == 0
        print(f"| {r.mode} | {r.hups} | {r.done:,} | {r.failed:,} | {run.cell(r.detail)} |")
    print(f"\ngoal 0 failed: {'met' if ok else 'NOT met'}")
    master_argv = master_argv.replace(str(run.ROOT) + "/", "")
    print(f"\nServer: `{master_argv}` (the config is a temp file; workers.count = 1, then 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
