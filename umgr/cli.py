"""The umgr command line: exec, daemon, status, doctor, bench."""
from __future__ import annotations

import argparse
import ctypes
import errno
import glob
import grp
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import trio

from umgr import embedded
from umgr.backends import HELD_MEMORY_OPTION, chain_identity, memory_stores, open_chain, persists, shown, takes
from umgr.backends.file import DEFAULT_STATE_DIR
from umgr.backends.region import new_memfd
from umgr.errors import BackendError
from umgr.kernel import PAGE_SIZE
from umgr import configfile
from umgr.console import (EXIT_UMGR, AppendOverDefault, ArgumentParser, Fatal, add_verbosity, budget_size_arg,
                          fatal_in, port_arg, reason, seconds_arg, setting_up, setup_logging, size_arg)
from umgr.sizes import format_size, parse_size
from umgr.daemon import BUDGET_REQUEST, HELLO_TIMEOUT, STATUS_REQUEST, Daemon, DaemonConfig, printable
from umgr.daemon.idlepoll import BATCH_FAULTS, BUSY_RATE
from umgr.daemon.idlepoll import MODES as IDLE_POLL_MODES
from umgr.daemon.priority import NICE, NICE_RANGE, set_priority
from umgr.daemon import fdstore
from umgr.daemon.notify import notify
from umgr.daemon.restart import on_crash, service_memory
from umgr.daemon.config import GRACE_SECONDS, MAX_MANAGED, MAX_MANAGED_PER_USER, MIN_REGION
from umgr.paging.cleancopies import MODES
from umgr.paging.tuning import CLEAN_COPIES, SMALLEST_ADOPTED_REGION
from umgr.daemon.listener import ControlSocket, SocketSetupError

log = logging.getLogger("umgr")

PR_SET_PDEATHSIG = 1
DEFAULT_SWAP_SIZE = "4G"
DEFAULT_RUNDIR = "/run/umgr"
DEFAULT_SOCKET = os.path.join(DEFAULT_RUNDIR, "control.sock")


def _backend_value(key: str, text: str):
    """A --backend option's value: sizes for size and cap, integers, else text."""
    if key in ("size", "cap"):
        return parse_size(text)
    try:
        return int(text)
    except ValueError:
        return text


def backend_spec(text: str) -> str:
    """A --backend value, checked: NAME[:KEY=VALUE,...] with NAME installed."""
    from umgr.backends import available_backends, parse_spec
    try:
        name, _ = parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    found = available_backends()
    if name not in found:
        raise argparse.ArgumentTypeError(f"unknown backend {name!r}; available: {', '.join(sorted(found))}")
    return text


def _installed_backends() -> list[str]:
    from umgr.backends import available_backends
    return sorted(available_backends())


backend_spec.values = _installed_backends   # what shell completion offers


def shim_path() -> str:
    here = os.path.join(os.path.dirname(__file__), "bindings")
    found = glob.glob(os.path.join(here, "libumgr_preload*.so"))
    if not found:
        import umgr.bindings
        found = glob.glob(os.path.join(os.path.dirname(umgr.bindings.__file__), "libumgr_preload*.so"))
    if not found:
        raise Fatal("umgr: the shim (libumgr_preload*.so) is not built; reinstall umgr")
    return found[0]


UNDO = "the default: undoes {} = true of the config file"


def _add_daemon_options(p: argparse.ArgumentParser, state_dir: str = DEFAULT_STATE_DIR) -> None:
    p.add_argument("--max-resident", type=budget_size_arg, default=0, metavar="SIZE",
                   help="memory budget per process, e.g. 256M (default: no limit)")
    p.add_argument("--backend", action=AppendOverDefault, type=backend_spec, metavar="NAME[:KEY=VALUE,...]",
                   help="swap store: file (default), compressed, redis, or a plug-in; given again, a chain, "
                        "fastest first (--backend compressed:cap=256M --backend file)")
    p.add_argument("--swap-size", type=size_arg, default=None, metavar="SIZE",
                   help=f"swap capacity (default {DEFAULT_SWAP_SIZE}; a swap file takes at most half the free "
                        "space where it goes unless this is given)")
    p.add_argument("--state-dir", default=state_dir, help=f"where the swap file lives ({state_dir})")
    p.add_argument("--policy", default="readahead", help="prefetch policy (none, readahead, stride, or a plug-in)")
    p.add_argument("--eviction", default="reuse",
                   help="eviction policy: reuse (default: keeps pages that refault soon resident), fifo (fault order), "
                        "or a plug-in")
    p.add_argument("--policy-opt", action=AppendOverDefault, default=[], metavar="KEY=VALUE",
                   help="an option of the prefetch policy, e.g. maximum=32 (umgr policies lists them)")
    p.add_argument("--eviction-opt", action=AppendOverDefault, default=[], metavar="KEY=VALUE",
                   help="an option of the eviction policy, e.g. hot_share=0.5")
    p.add_argument("--clean-copies", choices=MODES, default=CLEAN_COPIES,
                   help="pages read back from swap keep their swap copy until written, so evicting them "
                        "again writes nothing (a first write costs a fault): auto (default: while most "
                        "such pages leave unwritten), always, never")
    p.add_argument("--keep-clean", dest="clean_copies", action="store_const", const="always",
                   help="the same as --clean-copies always")
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                   help="serve every fault through the full (Python) path, not plain random faults in C: "
                        "slower; for comparison, or to rule the fast path out")
    p.add_argument("--no-move-out", dest="move_out", action="store_false",
                   help="evicted pages leave by MADV_DONTNEED alone (a UFFD_EVENT_REMOVE round trip per run), "
                        "not moved out by the shim's agent with UFFDIO_MOVE: slower; for comparison")
    p.add_argument("--idle-poll", choices=IDLE_POLL_MODES, default="auto",
                   help="keep idle CPUs polling rather than sleeping (a CPU latency request of 0 us; needs root), "
                        "so that waking a faulting thread is cheap: auto (default: while managed programs fault "
                        f"{BUSY_RATE} times a second or more, an eviction batch counted as {BATCH_FAULTS} faults), "
                        "always, never")
    p.add_argument("--nice", type=_nice, default=None, metavar="N",
                   help=f"the daemon's nice value, so that faults are served ahead of the programs waiting on "
                        f"them when those keep every CPU busy (default {NICE}, or lower if it starts lower; no "
                        "lower than 0 where it may use one CPU alone; below the value it starts at needs "
                        "CAP_SYS_NICE or RLIMIT_NICE)")
    p.add_argument("--min-region", type=_min_region, default=None, metavar="SIZE|auto",
                   help=f"smallest anonymous mapping to manage (default auto: {format_size(MIN_REGION)}, and "
                        f"smaller ones of a process, down to {format_size(SMALLEST_ADOPTED_REGION)}, once they hold "
                        "half its budget; a size: that size alone); exec passes it to the shim as UMGR_MIN_REGION "
                        "unless the program's environment has one")
    p.add_argument("--max-managed", type=size_arg, default=MAX_MANAGED, metavar="SIZE",
                   help=f"most memory to manage per process (default {format_size(MAX_MANAGED)}); "
                        "mappings past it stay the kernel's")
    p.add_argument("--max-managed-per-user", type=size_arg, default=MAX_MANAGED_PER_USER, metavar="SIZE",
                   help=f"most memory to manage for all processes of one user "
                        f"(default {format_size(MAX_MANAGED_PER_USER)})")
    p.add_argument("--metrics-port", type=port_arg, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDR",
                   help="address the metrics are served on (default 127.0.0.1; 0.0.0.0 or :: for all)")
    p.add_argument("--metrics-per-pid", action="store_true",
                   help="series per process (label pid) as well as per name: one set per process ever run")
    p.add_argument("--grace", type=_seconds, default=None, metavar="SECONDS",
                   help="how long a program whose daemon is gone waits for one before it is killed "
                        f"(default: {GRACE_SECONDS} for the daemon; {embedded.EXEC_GRACE_SECONDS} for exec, which restarts "
                        "its daemon, 0 when it cannot: two compressed tiers, --record-trace; "
                        "UMGR_GRACE_SECONDS in the program's environment wins)")


def _min_region(text: str) -> int | None:
    """A size, or None for `auto` (the default: small mappings taken up
    once they add up), so that the command line can undo a config file's size."""
    return None if text == "auto" else size_arg(text)


def _nice(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in NICE_RANGE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a nice value (a whole number from -20 to 19)")
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SECONDS_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds from 0 to {SECONDS_MAX}")
    return value


SECONDS_MAX = 2**32 - 1   # (HELLO_ACK carries the grace period in 32 bits)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="umgr", description="userspace memory manager")
    parser.add_argument("--version", action="version", version=f"umgr {version()}")
    add_verbosity(parser, "top")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("exec", help="run a program under umgr with an embedded daemon")
    _add_daemon_options(p)
    p.add_argument("--stats-json", metavar="FILE", help="write the run's figures here as JSON")
    p.add_argument("--record-trace", metavar="FILE",
                   help="write the faults and evictions of the run here, for umgr replay")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    p.set_defaults(func=cmd_exec)

    # Under systemd, RuntimeDirectory= and StateDirectory= (deploy/umgr.service)
    # say where the socket and the swap file go.
    p = sub.add_parser("daemon", help="run the daemon for processes started with the shim")
    _add_daemon_options(p, state_dir=configfile.systemd_directory("STATE_DIRECTORY", DEFAULT_STATE_DIR))
    p.add_argument("--config", metavar="FILE",
                   help=f"settings file (default {configfile.DEFAULT_PATH}, if it exists); options given here win")
    p.add_argument("--socket", default=os.path.join(configfile.systemd_directory("RUNTIME_DIRECTORY", DEFAULT_RUNDIR),
                                                    "control.sock"),
                   help="the control socket (default control.sock in $RUNTIME_DIRECTORY, else in /run/umgr)")
    p.add_argument("--group", help="let this group's members connect (socket mode 0660)")
    p.add_argument("--hello-timeout", type=seconds_arg, default=HELLO_TIMEOUT, metavar="SECONDS",
                   help=f"drop a connection that sends no first message for this long (default {HELLO_TIMEOUT:g})")
    p.add_argument("--no-persist", action="store_true",
                   help="keep no page tables and no named swap file in --state-dir: a daemon restarted after "
                        "a crash cannot take the programs back (they are killed after --grace)")
    # The config file's switches, undone (exec reads no config file).
    p.add_argument("--persist", dest="no_persist", action="store_false", help=UNDO.format("no-persist"))
    p.add_argument("--fast-path", dest="fast_path", action="store_true", help=UNDO.format("no-fast-path"))
    p.add_argument("--move-out", dest="move_out", action="store_true", help=UNDO.format("no-move-out"))
    p.add_argument("--no-metrics-per-pid", dest="metrics_per_pid", action="store_false",
                   help=UNDO.format("metrics-per-pid"))
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("status", help="show the targets of a running daemon")
    p.add_argument("--config", metavar="FILE", help=f"read socket from this file (default {configfile.DEFAULT_PATH})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None,
                       help=f"the daemon's socket (default: the config file's, else {DEFAULT_SOCKET}, else those of "
                            f"the umgr execs running under exec's default --state-dir, {DEFAULT_STATE_DIR})")
    where.add_argument("--state-dir", metavar="DIR", default=None,
                       help="show the umgr execs running under DIR (the --state-dir they were given), not a daemon")
    p.add_argument("--interval", type=seconds_arg, default=1.0, help="seconds between samples, for rates")
    p.add_argument("--watch", action="store_true", help="refresh the table every --interval until interrupted")
    p.add_argument("--json", action="store_true", help="one snapshot as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("budget", help="change a running process's budget")
    p.add_argument("pid", type=pid_arg, metavar="PID", help="a process the daemon manages (umgr status lists them)")
    p.add_argument("size", type=budget_arg, metavar="SIZE",
                   help="its new budget, e.g. 256M; 'none' for the daemon's --max-resident (no limit if it has "
                        "none). Lower, the process is paged down to it at once")
    p.add_argument("--config", metavar="FILE", help=f"read socket from this file (default {configfile.DEFAULT_PATH})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None,
                       help="the daemon's socket (found as umgr status finds it; of several umgr execs, the one "
                            "managing PID)")
    where.add_argument("--state-dir", metavar="DIR", default=None,
                       help="the umgr exec running under DIR (the --state-dir it was given), not a daemon")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser("replay", help="replay a recorded trace against policies and budgets, offline")
    p.add_argument("trace", metavar="FILE", help="from umgr exec --record-trace")
    p.add_argument("--policy", action="append", default=[], metavar="NAME[:KEY=VALUE,...][+NAME[:...]]",
                   help="a prefetch and/or eviction policy to replay (repeat to compare; default: as recorded)")
    p.add_argument("--max-resident", type=size_arg, default=None, metavar="SIZE",
                   help="budget per process (default: each one's recorded budget)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("policies", help="list the prefetch and eviction policies installed")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("doctor", help="probe what this kernel lets umgr do")
    p.set_defaults(func=cmd_doctor)

    # Everything after `bench` is the benchmark's (umgr.bench parses it): no
    # option of this parser starts with '-', so --help and the rest pass through.
    p = sub.add_parser("bench", help="benchmarks: umgr against kernel swap, fault service, io_uring, backends",
                       prefix_chars="+", add_help=False)
    p.add_argument("what", nargs=argparse.REMAINDER, help="NAME [OPTIONS...] (umgr bench --help lists them)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("completion", help="print a completion script (umgr completion bash >/etc/bash_completion.d/umgr)")
    p.add_argument("shell", choices=["bash"])
    p.set_defaults(func=cmd_completion)

    p = sub.add_parser("manpage", help="print the man page, umgr(1), in roff (umgr manpage | man -l -)")
    p.set_defaults(func=cmd_manpage)
    for name, p in sub.choices.items():
        if name != "bench":
            add_verbosity(p, "sub")
    parser.subcommands = sub.choices
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed_version
    try:
        return installed_version("umgr")
    except PackageNotFoundError:
        import umgr
        return umgr.__version__


def main(argv: list[str] | None = None) -> int:
    """umgr's exit status: the command's, or EXIT_UMGR (125) when umgr itself
    fails; then stderr has one line saying why (a traceback only for a bug)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command in ("daemon", "status", "budget"):
            args = _with_config_file(parser, args, argv)
        args.verbosity = setup_logging(args, logging.INFO if args.command == "daemon" else logging.WARNING)
        return args.func(args)
    except Exception as exc:
        return _failed(exc)


def _failed(exc: Exception) -> int:
    """EXIT_UMGR, after one line (a traceback only for a bug)."""
    fatal = fatal_in(exc)
    if fatal is None and isinstance(exc, OSError):  # the environment, not a bug: no traceback
        fatal = Fatal(f"umgr: {reason(exc)}" + (f": {exc.filename}" if exc.filename else ""))
    if fatal is None:
        log.exception("umgr: internal error")
    else:
        print(fatal, file=sys.stderr)
    return EXIT_UMGR


def _with_config_file(parser: argparse.ArgumentParser, args, argv: list[str] | None):
    """args again, with the config file's settings as defaults. umgr
    status and budget take only the socket from it: given --socket or
    --state-dir, they do not read it, and they pass over a default file
    they may not read (root's, holding a redis password)."""
    if args.command != "daemon":
        if args.socket or args.state_dir:
            return args
        if args.config is None and not os.access(configfile.DEFAULT_PATH, os.R_OK):
            return args
    path, settings = configfile.load(args.config)
    if not settings:
        return args
    command = parser.subcommands[args.command]
    configfile.apply(settings, command, path, only=None if args.command == "daemon" else {"socket"})
    return parser.parse_args(argv)


# ---- exec ------------------------------------------------------------------------
def cmd_exec(args) -> int:
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise Fatal("umgr exec: no program given (umgr exec [OPTIONS] -- PROGRAM ARGS...)")
    if args.stats_json:
        check_writable(args.stats_json, "--stats-json")
    if args.record_trace:
        check_writable(args.record_trace, "--record-trace")
    try:
        with setting_up(f"umgr exec: --state-dir {args.state_dir}"):
            run_dir, lock = embedded.make_run_dir(args.state_dir)
    except BackendError as exc:   # not the daemon's own directory
        raise Fatal(f"umgr exec: {exc}") from None
    held = -1
    try:
        config = _config(args, os.path.join(run_dir, embedded.SOCKET_NAME))
        held = _held_memory(args)
        daemon = embedded.EmbeddedDaemon(
            run_dir, lambda ready_fd: _embedded_daemon(args, config, program, run_dir, ready_fd, held),
            restartable=_exec_restartable(args))
        started = time.monotonic()
        try:
            daemon.start()
        except embedded.DaemonFailed:
            return EXIT_UMGR   # it said why
        try:
            status = _run_program(daemon, program, config)
        except CannotRun as exc:
            print(f"umgr: {printable(program[0])}: {exc.reason}", file=sys.stderr)
            return exc.status
        wall = time.monotonic() - started
        outcome = daemon.outcome()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.close(lock)
        if held >= 0:
            os.close(held)
    exit_code = 128 - status if status < 0 else status
    totals, backend_stats = outcome.totals, outcome.backend or EMPTY_BACKEND_STATS
    # (The counts are a clean end's, and of the last daemon when it was restarted.)
    if outcome.totals and not daemon.restarts and not totals.get("targets", 0) and args.verbosity >= 0:
        print(f"umgr: warning: {printable(program[0])} ran unmanaged: none of its processes attached to the "
              "daemon (statically linked and set-user-ID programs cannot load the shim, nor can one whose "
              "LD_PRELOAD was cleared)", file=sys.stderr)
    if args.verbosity > 0:
        print(exec_summary(exit_code, wall, totals, backend_stats), file=sys.stderr)
    if args.stats_json:
        figures = {
            "exit_code": exit_code,
            "faults": totals.get("faults", 0),
            "pages_in": totals.get("pages_in", 0),
            "pages_out": totals.get("pages_out", 0),
            "prefetched": totals.get("prefetched", 0),
            "peak_resident_bytes": totals.get("peak_resident_bytes", 0),
            "swap_bytes_written": backend_stats["pages_written"] * PAGE_SIZE,
            "swap_bytes_read": backend_stats["pages_read"] * PAGE_SIZE,
            "swap_slots_in_use_at_exit": backend_stats["used_pages"],
            "backend_tiers": backend_stats["tiers"],
            "wall_seconds": round(wall, 3),
            **{k: v for k, v in totals.items() if k not in ("faults", "pages_in", "pages_out", "prefetched")},
            "targets": totals.get("targets", 0),
            "daemon_restarts": daemon.restarts,
        }
        with setting_up(f"umgr exec: --stats-json {args.stats_json}"), open(args.stats_json, "w") as f:
            json.dump(figures, f, indent=2)
    return exit_code


# What --stats-json says of the store when the daemon died without reporting.
EMPTY_BACKEND_STATS = {"pages_written": 0, "pages_read": 0, "used_pages": 0, "tiers": []}


def _exec_restartable(args) -> bool:
    """Whether exec's daemon can be restarted: its state (tables, swap file,
    the compressed store's memfd that umgr exec holds) is saved for every
    store but a chain with two memory tiers; a trace would be cut in two."""
    return persists(args.backend or ["file"], memory_held=True) and not args.record_trace


def _held_memory(args) -> int:
    """The memfd umgr exec holds for a store in the daemon's memory, so it
    outlives a daemon that dies (-1: none needed). Closed on exec: the
    program never has it."""
    if not _exec_restartable(args) or not memory_stores(args.backend or []):
        return -1
    return new_memfd("umgr-store")


def _run_program(daemon: embedded.EmbeddedDaemon, program: list[str], config: DaemonConfig) -> int:
    """Run the program under the daemon (restarted if it dies); its wait
    status once it and every descendant the daemon serves are done."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [shim_path(), env.get("LD_PRELOAD")]))
    env["UMGR_SOCKET"] = config.socket_path
    env["UMGR_EXEC_PID"] = str(os.getpid())   # the shims kill their process at once if umgr exec dies
    # The shim reports mappings of this size as they are made, before the
    # program touches them (the maps scan finds them up to 50 ms later).
    env.setdefault("UMGR_MIN_REGION", str(config.min_region))
    try:
        proc = subprocess.Popen(program, env=env, preexec_fn=_child_setup)
    except OSError as exc:
        daemon.finish()
        while daemon.pidfd >= 0 and daemon.reap() == "restarted":
            pass
        raise CannotRun(program[0], exc) from None
    forward = SignalForwarding(proc)
    program_fd, status = os.pidfd_open(proc.pid), None
    try:
        while True:
            fds = [daemon.pidfd] + ([program_fd] if status is None else [])
            ended = embedded.ended(*fds)
            if status is None and program_fd in ended:
                status = proc.wait()
                daemon.finish()   # it goes once the program's descendants it serves are gone too
            if daemon.pidfd in ended:
                outcome = daemon.reap()
                if outcome == "done":
                    return status
                if outcome == "lost":
                    if status is None:   # its shims would kill it after the grace period anyway
                        proc.kill()
                        raise Fatal(f"umgr exec: {printable(program[0])} was killed: its daemon died "
                                    "and could not be restarted")
                    return status
    finally:
        os.close(program_fd)
        forward.restore()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_writable(path: str, option: str) -> None:
    """Refuse an output file umgr could not write, before the program runs
    (without creating it)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        problem = "is a directory"
    elif os.path.exists(path):
        problem = None if os.access(path, os.W_OK) else "cannot be written"
    elif not os.path.isdir(parent):
        problem = f"{parent} is not a directory"
    else:
        problem = None if os.access(parent, os.W_OK | os.X_OK) else f"cannot create files in {parent}"
    if problem:
        raise Fatal(f"umgr exec: {option} {path}: {problem}")


def exec_summary(exit_code: int, wall: float, totals: dict, backend_stats: dict) -> str:
    """`umgr exec -v`'s last line: what the run cost."""
    targets = totals.get("targets", 0)
    return (f"umgr: exit {exit_code} after {wall:.2f} s; {targets} process{'es' if targets != 1 else ''}, "
            f"peak resident {format_size(totals.get('peak_resident_bytes', 0))}, "
            f"{totals.get('faults', 0)} faults, {totals.get('pages_out', 0)} pages out, "
            f"{totals.get('pages_in', 0)} in; swap written {format_size(backend_stats['pages_written'] * PAGE_SIZE)}, "
            f"read {format_size(backend_stats['pages_read'] * PAGE_SIZE)}")


class CannotRun(Exception):
    """The program could not be started; a shell would exit with `status`."""

    def __init__(self, program: str, exc: OSError):
        super().__init__(program)
        # As a shell: a program (or its #! interpreter) that is not there is
        # 127, one that is there but cannot be executed is 126.
        self.status = 127 if exc.errno == errno.ENOENT else 126
        if exc.errno == errno.ENOENT and "/" not in program:
            self.reason = "command not found"
        elif exc.errno == errno.EACCES and os.path.isdir(program):
            self.reason = "Is a directory"
        else:
            self.reason = os.strerror(exc.errno) if exc.errno else str(exc)


def _config(args, socket_path: str) -> DaemonConfig:
    from umgr.policies import load_eviction, load_prefetch, parse_options
    from umgr.probe import daemon_refused, zap_mode
    try:  # a bad name or option here would otherwise turn every target away
        policy_options, eviction_options = parse_options(args.policy_opt), parse_options(args.eviction_opt)
        load_prefetch(args.policy, **policy_options)
        load_eviction(args.eviction, **eviction_options)
    except Exception as exc:
        raise Fatal(f"umgr {args.command}: {exc}") from None
    refused = daemon_refused()
    if refused:
        raise Fatal(f"umgr {args.command}: {refused}, so its daemon could serve no program: run umgr as root "
                    f"(with CAP_SYS_PTRACE), or have such a `umgr daemon --group NAME` serve this user's programs "
                    f"(see \"Serving other users\" in the README)")
    group = getattr(args, "group", None)
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise Fatal(f"umgr {args.command}: --group {group}: no such group") from None
    min_region = MIN_REGION if args.min_region is None else args.min_region
    return DaemonConfig(socket_path=socket_path, max_resident=args.max_resident, min_region=min_region,
                        adapt_min_region=args.min_region is None,
                        policy=args.policy, eviction=args.eviction, zap_mode=zap_mode(),
                        group=getattr(args, "group", None),
                        hello_timeout=getattr(args, "hello_timeout", HELLO_TIMEOUT),
                        clean_copies=args.clean_copies, policy_options=policy_options,
                        eviction_options=eviction_options, grace_seconds=_grace(args),
                        max_managed=args.max_managed, max_managed_per_user=args.max_managed_per_user,
                        fast_path=args.fast_path, move_out=args.move_out, idle_poll=args.idle_poll)


def _warn_if_group_has_no_uffd(group: str) -> None:
    """--group lets the group's members connect; their programs also need
    a userfaultfd of their own, which a default kernel does not give them."""
    from umgr.probe import UFFD_DEVICE, uffd_closed_to_group
    why = uffd_closed_to_group(grp.getgrnam(group).gr_gid)
    if why:
        log.warning("members of group %s cannot create a userfaultfd (%s): their programs will run unmanaged. "
                    "Let the group open it: chgrp %s %s && chmod 0660 %s (a udev rule keeps that across boots: "
                    "see \"Serving other users\" in the README)", group, why, group, UFFD_DEVICE, UFFD_DEVICE)


def _grace(args) -> int:
    if args.grace is not None:
        return args.grace
    if args.command != "exec":
        return GRACE_SECONDS
    # A restarted embedded daemon takes the program back; one that cannot be
    # restarted leaves nothing to wait for.
    return embedded.EXEC_GRACE_SECONDS if _exec_restartable(args) else 0


def _child_setup() -> None:
    # If umgr dies, its program must not hang on a fault nobody serves.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _open_backend(args, state=None, held: int = -1):
    """The store --backend names (a chain when given more than once). With
    `state` (a StateDir), the file backend's named swap file there, and
    the compressed store's memfd `held` (by umgr exec, or the service
    manager for umgr daemon), reused when a dead daemon's targets may come
    back."""
    defaults = {"directory": args.state_dir}
    if args.swap_size is not None:   # (else each store's own default: the file's depends on its disk)
        defaults["size"] = args.swap_size
    if state is not None:
        defaults.update(directory=state.path, swap_name="swap", reuse=state.swap_reusable())
        if any(takes(spec, "instance") for spec in args.backend or []):
            defaults["instance"] = state.store_instance()
        if held >= 0:
            defaults[HELD_MEMORY_OPTION] = held
    try:
        with setting_up(f"umgr {args.command}: --state-dir {args.state_dir}"):
            backend = open_chain(args.backend or ["file"], defaults, _backend_value)
        if state is not None:
            state.adopt_slots(backend.slots)
            backend.slots_adopted()
        return backend
    except BackendError as exc:  # says what and where already
        raise Fatal(f"umgr {args.command}: {exc}") from None
    except ValueError as exc:    # a bad spec or option, an unreachable store
        raise Fatal(f"umgr {args.command}: --backend: {exc}") from None


def _serve_metrics(daemon, args) -> str | None:
    """Start the metrics server if asked; its address, for the start-up line."""
    if args.metrics_port is None:
        return None
    from umgr.metrics import serve_metrics
    address = args.metrics_address
    with setting_up(f"umgr {args.command}: metrics on {address} port {args.metrics_port}"):
        serve_metrics(daemon, args.metrics_port, address, args.metrics_per_pid)
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{args.metrics_port}/metrics"


def startup_line(config: DaemonConfig, args, metrics: str | None, backend) -> str:
    """What a running daemon serves, in one line (the store's size as
    opened: a spec's own size= wins over --swap-size)."""
    budget = format_size(config.max_resident) if config.max_resident else "none"
    return (f"umgr {version()} serving {config.socket_path}: budget {budget} per process, "
            f"backend {' + '.join(shown(spec) for spec in args.backend or ['file'])} "
            f"({format_size(backend.slots.capacity * PAGE_SIZE)} in {args.state_dir}), "
            f"policy {config.policy}, eviction {config.eviction}, metrics {metrics or 'off'}")


def _open_trace(args, config: DaemonConfig, program: list[str]):
    """The --record-trace file (its place was checked before the backend was made)."""
    if not args.record_trace:
        return None
    from umgr.trace import TraceWriter
    meta = {"umgr": version(), "command": program, "policy": config.policy,
            "policy_options": config.policy_options, "eviction": config.eviction,
            "eviction_options": config.eviction_options, "max_resident": config.max_resident,
            "clean_copies": config.clean_copies, "started": time.time()}
    with setting_up(f"umgr exec: --record-trace {args.record_trace}"):
        return TraceWriter(args.record_trace, meta)


def _embedded_daemon(args, config: DaemonConfig, program: list[str], run_dir: str, ready_fd: int, held: int) -> int:
    """exec's daemon, in its child process (umgr/embedded.py): its state in
    the run directory (and the memfd `held`) when it can be restarted.
    Returns its exit status."""
    from umgr.daemon.server import raise_fd_limit
    from umgr.daemon.statedir import StateDir
    trace = backend = state = None
    clean = False
    try:
        set_priority(args.nice)   # (first: the threads made from here on inherit it)
        if _exec_restartable(args):
            raise_fd_limit()   # first: each saved target it loads holds its directory open
            with setting_up(f"umgr exec: --state-dir {args.state_dir}"):
                state = StateDir(run_dir, config.socket_path)
        backend = _open_backend(args, state, held)
        trace = _open_trace(args, config, program)
        on_crash = (f"umgr exec restarts the daemon (up to {embedded.MAX_RESTARTS} times a run), which takes the "
                    "program back" if state is not None else
                    "umgr exec kills the program: nothing is saved (a chain of two compressed tiers, or "
                    "--record-trace)")
        daemon = Daemon(config, backend, trace, state=state, on_crash=on_crash)

        async def serve() -> None:
            log.info("%s", startup_line(config, args, _serve_metrics(daemon, args), backend))
            await embedded.serve_until_finished(daemon, ready_fd)

        trio.run(serve)
        clean = True
        totals = daemon.run_totals()
        totals["targets"] = daemon.targets_seen
        totals["idle_poll_seconds"] = round(daemon.lifecycle.idle_poll.seconds_held(), 3)
        totals.update(_own_cost())
        embedded.write_outcome(run_dir, totals, backend.statistics())
        return 0
    except Exception as exc:
        return _failed(exc)
    finally:
        if backend is not None:
            if state is not None and clean:
                backend.remove()
            backend.close()
        if state is not None:
            state.close(clean)
        if trace is not None:
            trace.close()
            if trace.error:
                print(f"umgr: trace {args.record_trace}: {trace.error}", file=sys.stderr)


def _own_cost() -> dict:
    """What the embedded daemon (this process, every thread) cost: CPU
    seconds and its peak resident memory, the page stores in it included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"daemon_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "daemon_peak_rss_bytes": usage.ru_maxrss * 1024}   # (ru_maxrss: KiB on Linux)


class SignalForwarding:
    """Signals umgr exec gets go to the program (SIGINT from a terminal
    reaches the whole process group already, so it is ignored here)."""

    FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self, proc: subprocess.Popen):
        self._before = {signum: signal.getsignal(signum) for signum in (*self.FORWARDED, signal.SIGINT)}

        def forward(signum, frame):
            if proc.returncode is None:
                proc.send_signal(signum)
        for signum in self.FORWARDED:
            signal.signal(signum, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)


# ---- daemon ----------------------------------------------------------------------------
def cmd_daemon(args) -> int:
    from umgr.daemon.shutdown import serve_until_stopped
    config = _config(args, args.socket)
    if config.group:
        _warn_if_group_has_no_uffd(config.group)
    state = _open_state(args)
    held, keeping = service_memory(args.backend or ["file"], state)
    # Whether the state must outlive an exit that is not a clean stop: the
    # daemon served (its programs may come back), or a dead daemon's
    # programs may come back for it. One that fails before it serves leaves
    # no swap file behind.
    keep_state = state is not None and state.swap_reusable()
    backend = None
    clean = False

    async def run():
        nonlocal clean
        crash = on_crash(args.backend or ["file"], args.no_persist, config.grace_seconds, state, keeping)
        daemon = Daemon(config, backend, state=state, on_crash=crash)
        metrics = _serve_metrics(daemon, args)
        control = _control_socket(config)

        def serving() -> None:
            nonlocal keep_state
            keep_state = True
            line = startup_line(config, args, metrics, backend)
            log.info("%s", line)
            notify("READY=1", f"STATUS={line}")

        await serve_until_stopped(daemon, control, on_serving=serving)
        clean = True

    try:
        set_priority(args.nice)   # (first: the threads made from here on inherit it)
        backend = _open_backend(args, state, held)
        trio.run(run)
    finally:
        clean = clean or not keep_state
        if backend is not None:
            if state is not None and clean:
                backend.remove()     # nothing will come back for it
            backend.close()
        if state is not None:
            state.close(clean)
        if held >= 0:
            if clean:
                fdstore.remove(fdstore.STORE_NAME)
            os.close(held)
    return 0


def _control_socket(config: DaemonConfig) -> ControlSocket:
    with setting_up(f"umgr daemon: --socket {config.socket_path}"):
        try:
            return ControlSocket(config.socket_path, config.group)
        except SocketSetupError as exc:
            raise Fatal(f"umgr daemon: {exc}") from None


def _open_state(args):
    """The state directory's saved tables (umgr/daemon/statedir.py), when
    every store of the chain outlives the daemon (backends.persists)."""
    from umgr.daemon.server import raise_fd_limit
    from umgr.daemon.statedir import StateDir
    if args.no_persist:
        return None
    if not persists(args.backend or ["file"], memory_held=fdstore.available()):
        log.info("page tables are not saved: a compressed store lives in the daemon's memory, and only a service "
                 "manager's descriptor store keeps it for a restarted daemon (systemd's FileDescriptorStoreMax=; "
                 "one such store in a chain, and umgr exec keeps its own)")
        return None
    try:   # (before anything saved is forgotten: a chain that cannot open is refused first)
        chain = chain_identity(args.backend or ["file"], _backend_value)
    except ValueError as exc:
        raise Fatal(f"umgr daemon: --backend: {exc}") from None
    raise_fd_limit()   # first: each saved target it loads holds its directory open
    try:
        with setting_up(f"umgr daemon: --state-dir {args.state_dir}"):
            state = StateDir(args.state_dir, args.socket)
            state.check_backend(chain)
            return state
    except BackendError as exc:
        raise Fatal(f"umgr daemon: {exc}") from None


# ---- status ------------------------------------------------------------------------------
def ask_daemon(path: str, request: bytes) -> bytes:
    """A one-message request on the control socket (STATUS, BUDGET) and its
    answer, every message until the daemon closes the connection (a large
    STATUS comes in parts; b"": the daemon dropped the connection)."""
    parts = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        s.send(request)
        while part := s.recv(1 << 20):
            parts.append(part)
    return b"".join(parts)


def query_status(path: str) -> dict:
    return json.loads(ask_daemon(path, STATUS_REQUEST))


def cmd_status(args) -> int:
    if args.json and args.watch:
        raise Fatal("umgr status: --json shows one snapshot; --watch refreshes a table: choose one")
    sockets = _status_sockets(args)
    if args.json:   # (one daemon's status: a script reads one shape)
        sockets = [_one_socket(sockets, args, "umgr status --json")]
    before, taken = _query_all(sockets), time.monotonic()
    try:
        while True:
            time.sleep(args.interval)
            now, now_taken = _query_all(sockets), time.monotonic()
            if args.json:
                print(json.dumps(now[sockets[0]], indent=2))
                return 0
            table = _status_tables(before, now, now_taken - taken, several=len(sockets) > 1)
            if not args.watch:
                print(table)
                return 0
            if sys.stdout.isatty():
                sys.stdout.write(CLEAR_SCREEN)
            stamp = time.strftime("%H:%M:%S")
            where = printable(sockets[0]) if len(sockets) == 1 else f"{len(now)} umgr execs"
            print(f"umgr status {where}, every {args.interval:g} s, {stamp} (Ctrl-C to stop)\n"
                  f"{table}\n", flush=True)
            before, taken = now, now_taken
    except KeyboardInterrupt:
        return 0


def _status_tables(before: dict[str, dict], now: dict[str, dict], interval: float, several: bool) -> str:
    """One daemon's table; of several (umgr execs), each under its socket."""
    if not several:
        (path, status), = now.items()
        return format_status(before.get(path, status), status, interval)
    return "\n\n".join(f"umgr exec at {printable(path)}:\n{format_status(before.get(path, status), status, interval)}"
                       for path, status in now.items())


CLEAR_SCREEN = "\x1b[H\x1b[2J"


# ---- budget ------------------------------------------------------------------------------
def pid_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)


def budget_arg(text: str) -> int:
    """A budget: a size of at least MIN_BUDGET_BYTES, or 'none' (0)."""
    return 0 if text.strip().lower() == "none" else budget_size_arg(text)


def cmd_budget(args) -> int:
    path = _budget_socket(_status_sockets(args, "umgr budget"), args)
    try:
        answer = ask_daemon(path, BUDGET_REQUEST + json.dumps({"pid": args.pid, "bytes": args.size}).encode())
    except OSError as exc:
        raise Fatal(f"umgr budget: no daemon at {path}: {reason(exc)}") from None
    if not answer:
        raise Fatal(f"umgr budget: the daemon at {path} dropped the request (its log says why)")
    reply = json.loads(answer)
    if "error" in reply:
        raise Fatal(f"umgr budget: {reply['error']}")
    new, was = reply["budget_bytes"], reply["was_bytes"]
    line = f"pid {reply['pid']}: budget {format_size(new) if new else 'none'} (was {format_size(was) if was else 'none'})"
    if new and reply["resident_bytes"] > new:
        line += f"; {format_size(reply['resident_bytes'])} resident, paging down to it"
    print(line)
    return 0


def _budget_socket(sockets: list[str], args) -> str:
    """The socket of the daemon managing args.pid: of several umgr execs,
    the one whose status lists it."""
    if len(sockets) == 1:
        return sockets[0]
    for path, status in _answers(sockets):
        if any(t["pid"] == args.pid for t in status["targets"]):
            return path
    state_dir = args.state_dir or DEFAULT_STATE_DIR
    raise Fatal(f"umgr budget: pid {args.pid} is managed by none of the {len(sockets)} umgr execs running "
                f"under {printable(state_dir)}")


LISTENING, STALE, DENIED = "listening", "stale", "denied"


def _probe(path: str) -> str:
    """Whether a daemon listens on the socket at `path` (LISTENING), none
    does any more (STALE: a daemon killed outside systemd leaves its
    socket), or this user may not ask (DENIED: root's socket, mode 0600)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.setblocking(False)   # (a full backlog answers EAGAIN rather than blocking)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return STALE
        except PermissionError:
            return DENIED
        except OSError:   # EAGAIN: listening, busy; anything else the query itself will say
            return LISTENING
    return LISTENING


def _status_sockets(args, command: str = "umgr status") -> list[str]:
    """The sockets status asks: that of the umgr exec running under
    --state-dir; else the one named (--socket, or the config file's); else
    the daemon's default, if a daemon listens there (and this user may
    ask it, or runs no umgr exec), or those of the umgr execs running
    under exec's default state directory (exec runs its daemon on a
    socket of its own), all of them when several run."""
    if args.state_dir is None and args.socket is not None:
        return [args.socket]
    if args.state_dir is None and os.path.exists(DEFAULT_SOCKET):
        answer = _probe(DEFAULT_SOCKET)
        # (A user who may not ask the daemon is shown their own umgr exec, if one runs.)
        if answer == LISTENING or (answer == DENIED and not embedded.live_runs(DEFAULT_STATE_DIR)):
            return [DEFAULT_SOCKET]
    state_dir = args.state_dir or DEFAULT_STATE_DIR   # (exec's default --state-dir)
    runs = embedded.live_runs(state_dir)
    if runs:
        return runs
    if args.state_dir is not None:
        raise Fatal(f"{command}: no umgr exec runs under {printable(state_dir)}")
    raise Fatal(f"{command}: no daemon at {DEFAULT_SOCKET} and no umgr exec under {printable(state_dir)}")


def _one_socket(sockets: list[str], args, command: str) -> str:
    """The one socket of `sockets`, where a command can use only one."""
    if len(sockets) == 1:
        return sockets[0]
    state_dir = args.state_dir or DEFAULT_STATE_DIR
    instead = " in place of --state-dir" if args.state_dir is not None else ""
    raise Fatal(f"{command}: {len(sockets)} umgr execs run under {printable(state_dir)}; name one with "
                f"--socket{instead}: " + ", ".join(printable(r) for r in sockets))


def _query_all(sockets: list[str]) -> dict[str, dict]:
    """The status of each socket's daemon. With several (umgr execs), one
    that does not answer (it ended since they were listed, or dropped the
    request as it ended) is left out; none answering is an error."""
    if len(sockets) == 1:
        return {sockets[0]: _query(sockets[0])}
    answers = dict(_answers(sockets))
    if not answers:
        raise Fatal(f"umgr status: none of the {len(sockets)} umgr execs found answered (they may have ended)")
    return answers


def _answers(sockets: list[str]) -> Iterator[tuple[str, dict]]:
    """(socket, status) of each daemon that answers: not one that ended
    since it was listed, or dropped the request as it ended (ValueError:
    an empty or cut reply)."""
    for path in sockets:
        try:
            status = query_status(path)
        except (OSError, ValueError):
            continue
        yield path, status


def _query(path: str) -> dict:
    try:
        return query_status(path)
    except OSError as exc:
        raise Fatal(f"umgr status: no daemon at {path}: {reason(exc)}") from None
    except ValueError:   # (an empty reply: it dropped the request, or ended as it read it)
        raise Fatal(f"umgr status: the daemon at {path} dropped the request (its log says why)") from None


NAME_WIDTH = 16   # the metrics' name label (UMGR_NAME, systemd unit or the name run by), cut to fit


def _name_cell(name: str) -> str:
    name = printable(name)
    return f"{name:<{NAME_WIDTH}}" if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 1] + "~"


def format_status(first: dict, second: dict, interval: float) -> str:
    before = {t["pid"]: t for t in first["targets"]}
    rows = [f"{'PID':>7} {'BUDGET':>9} {'RESIDENT':>9} {'SWAPPED':>9} {'FAULTS/s':>9} {'IN/s':>8} {'OUT/s':>8}  "
            f"{'NAME':<{NAME_WIDTH}}  COMMAND"]
    for t in second["targets"]:
        old = before.get(t["pid"], t)
        rate = lambda key: (t[key] - old[key]) / interval
        budget = format_size(t["budget_bytes"]) if t["budget_bytes"] else "-"
        rows.append(f"{t['pid']:>7} {budget:>9} {format_size(t['resident_bytes']):>9} "
                    f"{format_size(t['swapped_bytes']):>9} {rate('faults'):>9.0f} {rate('pages_in'):>8.0f} "
                    f"{rate('pages_out'):>8.0f}  {_name_cell(t.get('name') or '-')}  {printable(t['command'])[:40]}")
    b = second["backend"]
    rows.append(f"backend {b['backend']}: {format_size(b['used_pages'] * PAGE_SIZE)} of "
                f"{format_size(b['capacity_pages'] * PAGE_SIZE)} used")
    tiers = b.get("tiers", [])   # one line per tier, for chains and tiers with a ratio
    for tier in tiers if len(tiers) > 1 or (tiers and "ratio" in tiers[0]) else []:
        ratio = f", {tier['ratio']:.2f}x" if tier.get("ratio") else ""
        heap = f" (heap {format_size(tier['heap_bytes'])})" if "heap_bytes" in tier else ""
        rows.append(f"  {tier['tier']}: {tier['pages']} pages in {format_size(tier['used_bytes'])}{heap} of "
                    f"{format_size(tier['capacity_bytes'])}{ratio}, {tier['read_seconds_per_page'] * 1e6:.0f} us a read")
    if second.get("on_crash"):
        rows.append(f"on a crash: {printable(second['on_crash'])}")
    return "\n".join(rows)


# ---- replay, policies -------------------------------------------------------------
def cmd_replay(args) -> int:
    from umgr.trace import TraceError, read_trace
    from umgr.tracereplay import format_rows, replay_trace
    try:
        meta, records = read_trace(args.trace)
        rows = replay_trace(meta, records, args.policy, args.max_resident)
    except OSError as exc:
        raise Fatal(f"umgr replay: {args.trace}: {reason(exc)}") from None
    except (TraceError, ValueError, TypeError) as exc:
        raise Fatal(f"umgr replay: {exc}") from None
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_rows(rows))
    return 0


def cmd_policies(args) -> int:
    from umgr.policies import installed
    rows = installed()
    width = max(len(name) for name, *_ in rows)
    for name, kind, origin, about in rows:
        print(f"{name:<{width}}  {kind:<8}  {origin:<8}  {about}")
    return 0


# ---- doctor, bench --------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from umgr.probe import doctor
    return doctor()


def cmd_bench(args) -> int:
    from umgr.bench import main as bench_main
    return bench_main(args.what)


def cmd_completion(args) -> int:
    from umgr.docgen import bash_completion
    print(bash_completion(build_parser()), end="")
    return 0


def cmd_manpage(args) -> int:
    from umgr.docgen import manpage
    print(manpage(build_parser(), version()), end="")
    return 0
