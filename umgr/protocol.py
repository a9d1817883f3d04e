"""The control protocol between the shim and the daemon.

Mirrors bindings/shim/protocol.h (the C side is the reference; change both).
Every message is one SOCK_SEQPACKET datagram starting with a header
(magic, type, size). Decoding is strict: anything malformed raises
ProtocolError, and the caller drops that connection only.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

from umgr import hints

MAGIC = 0x524D4755
VERSION = 8  # 2: HELLO names the process; 3: HELLO_ACK grows grace_seconds, DETACH; 4: HELLO's probe page;
             # 5: HELLO's flags (RESUME), empty ZAP; 6: MOVE_OUT; 7: ZAP_DONE of a MOVE_OUT says why it stopped;
             # 8: MOVE_OUT's page hashes, ZAP_DONE's changed pages
ZAP_MAX_RANGES = 1024  # UIO_MAXIOV

HEADER = struct.Struct("<IHH")
HELLO = struct.Struct("<IHH Ii QQ 32s 64s Q II")
HELLO_RESUME = 1  # HELLO flag: a process whose daemon died, asking a restarted one to take it back
HELLO_ACK = struct.Struct("<IHH iI Q II")
RANGE_MSG = struct.Struct("<IHH QQ")
ADVISE = struct.Struct("<IHH QQ II")
ACK = struct.Struct("<IHH iI")
ZAP_HEAD = struct.Struct("<IHH II")
ZAP_DONE = struct.Struct("<IHH Iiq IIQ")
MOVE_MAX_PAGES = 2048          # the pages a MOVE_OUT may name (UMGR_MOVE_MAX_PAGES)
CHANGED_MAX = 64               # the changed pages its answer may name (UMGR_CHANGED_MAX)
CHANGED_INDEX_BYTES = 4096     # ZAP_DONE's changed pages follow their indices (UMGR_CHANGED_INDEX_BYTES)
ZAP_RANGE_DTYPE = np.dtype([("start", "<u8"), ("length", "<u8")])


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    REGION = 3
    ACK = 4
    ADVISE = 5
    FORKED = 6
    ZAP = 16
    ZAP_DONE = 17
    DETACH = 18
    DETACH_DONE = 19
    MOVE_OUT = 20   # a ZAP's ranges, moved out by the agent (UFFDIO_MOVE) instead of discarded


class Advice(enum.IntEnum):
    """umgr_advise() advice values (README "Hints"): umgr.hints' public ints,
    as umgr.h's enum umgr_advice is the C protocol's."""
    COLD = hints.COLD
    WILLNEED = hints.WILLNEED
    DISCARDABLE = hints.DISCARDABLE


class ZapMode(enum.IntEnum):
    AGENT = 1
    REMOTE = 2


class ProtocolError(ValueError):
    """A message that does not follow the protocol."""


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    max_resident: int
    min_region: int
    policy: str
    name: str = ""  # UMGR_NAME: the target's metrics label ("": the daemon picks one)
    probe: int = 0      # an untouched private anonymous page the daemon may fill (peer.py)
    flags: int = 0      # HELLO_RESUME


@dataclass(frozen=True, slots=True)
class Region:
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class Forked:
    child_pid: int   # 0: the last fork made no child to name (its event, if the kernel sent one, names none)


@dataclass(frozen=True, slots=True)
class Advise:
    start: int
    length: int
    advice: int  # an Advice value if valid; an unknown one is answered EINVAL, not dropped


@dataclass(frozen=True, slots=True)
class ZapDone:
    seq: int
    error: int     # 0 or a positive errno; for MOVE_OUT, negative: no move can be made in that process
    bytes: int     # zapped or moved out, from the start of the list
    changed: int = 0      # MOVE_OUT: pages moved out whose content is not the daemon's copy
    changed_at: int = 0   # where the agent keeps them (protocol.h, struct umgr_zap_done)


def _check_header(data: bytes, layout: struct.Struct | None = None) -> int:
    if len(data) < HEADER.size:
        raise ProtocolError(f"truncated message ({len(data)} bytes)")
    magic, msg_type, size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic:#x}")
    if size != len(data):
        raise ProtocolError(f"size field {size} but {len(data)} bytes received")
    if layout is not None and len(data) != layout.size:
        raise ProtocolError(f"message type {msg_type} must be {layout.size} bytes, got {len(data)}")
    return msg_type


def decode_control(data: bytes) -> Hello | Region | Forked | Advise:
    """A message from a shim on the control connection."""
    msg_type = _check_header(data)
    if msg_type == MsgType.HELLO:
        _check_header(data, HELLO)
        _, _, _, version, pid, max_resident, min_region, policy, name, probe, flags, _ = HELLO.unpack(data)
        if version != VERSION:
            raise ProtocolError(f"protocol version {version}, daemon speaks {VERSION}")
        try:
            policy_name = policy.split(b"\0", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("policy name is not ASCII") from None
        # Any bytes are a name: it is only a label, made printable where shown.
        label = name.split(b"\0", 1)[0].decode("utf-8", "replace")
        if flags & ~HELLO_RESUME:
            raise ProtocolError(f"unknown HELLO flags {flags:#x}")
        return Hello(pid, max_resident, min_region, policy_name, label, probe, flags)
    if msg_type in (MsgType.REGION, MsgType.FORKED):
        _check_header(data, RANGE_MSG)
        _, _, _, start, length = RANGE_MSG.unpack(data)
        return Region(start, length) if msg_type == MsgType.REGION else Forked(start)
    if msg_type == MsgType.ADVISE:
        _check_header(data, ADVISE)
        _, _, _, start, length, advice, _ = ADVISE.unpack(data)
        try:
            advice = Advice(advice)
        except ValueError:
            pass  # well-formed message, bad argument: the handler answers EINVAL
        return Advise(start, length, advice)
    raise ProtocolError(f"unexpected message type {msg_type}")


def decode_zap_done(data: bytes) -> ZapDone:
    msg_type = _check_header(data, ZAP_DONE)
    if msg_type != MsgType.ZAP_DONE:
        raise ProtocolError(f"agent sent message type {msg_type}")
    _, _, _, seq, error, nbytes, changed, _, changed_at = ZAP_DONE.unpack(data)
    if changed > CHANGED_MAX:
        raise ProtocolError(f"agent names {changed} changed pages, more than a move may have")
    return ZapDone(seq, error, nbytes, changed, changed_at)


def encode_hello_ack(status: int, zap_mode: ZapMode, features: int, grace_seconds: int = 0) -> bytes:
    return HELLO_ACK.pack(MAGIC, MsgType.HELLO_ACK, HELLO_ACK.size, status, zap_mode, features, grace_seconds, 0)


def encode_detach() -> bytes:
    return HEADER.pack(MAGIC, MsgType.DETACH, HEADER.size)


def decode_detach_done(data: bytes) -> None:
    msg_type = _check_header(data, HEADER)
    if msg_type != MsgType.DETACH_DONE:
        raise ProtocolError(f"agent answered DETACH with message type {msg_type}")


def encode_ack(status: int) -> bytes:
    return ACK.pack(MAGIC, MsgType.ACK, ACK.size, status, 0)


def encode_zap(seq: int, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """A ZAP of the ranges (byte addresses and lengths)."""
    ranges = _zap_ranges(starts, lengths)
    return ZAP_HEAD.pack(MAGIC, MsgType.ZAP, ZAP_HEAD.size + ranges.nbytes, seq, len(ranges)) + ranges.tobytes()


def encode_move_out(seq: int, starts: np.ndarray, lengths: np.ndarray, hashes: np.ndarray) -> bytes:
    """A MOVE_OUT of the ranges, with each of their pages' hash (0: not
    checked), in order: at most MOVE_MAX_PAGES pages."""
    ranges = _zap_ranges(starts, lengths)
    hashes = np.ascontiguousarray(hashes, "<u8")
    if len(hashes) > MOVE_MAX_PAGES or len(hashes) << 12 != int(ranges["length"].sum()):
        raise ValueError(f"a move carries a hash for each of its pages, at most {MOVE_MAX_PAGES}")
    size = ZAP_HEAD.size + ranges.nbytes + hashes.nbytes
    return ZAP_HEAD.pack(MAGIC, MsgType.MOVE_OUT, size, seq, len(ranges)) + ranges.tobytes() + hashes.tobytes()


def _zap_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    count = len(starts)
    if not 0 <= count <= ZAP_MAX_RANGES:   # an empty one is a barrier (AgentZapper.barrier)
        raise ValueError(f"a zap carries 0..{ZAP_MAX_RANGES} ranges, not {count}")
    ranges = np.empty(count, ZAP_RANGE_DTYPE)
    ranges["start"] = starts
    ranges["length"] = lengths
    return ranges


# Used by tests and tools that speak the shim's side.
def encode_hello(pid: int, max_resident: int = 0, min_region: int = 0, policy: str = "",
                 version: int = VERSION, name: str = "", probe: int = 0, flags: int = 0) -> bytes:
    return HELLO.pack(MAGIC, MsgType.HELLO, HELLO.size, version, pid, max_resident, min_region,
                      policy.encode("ascii"), name.encode(), probe, flags, 0)


def encode_region(start: int, length: int, msg_type: MsgType = MsgType.REGION) -> bytes:
    return RANGE_MSG.pack(MAGIC, msg_type, RANGE_MSG.size, start, length)


def encode_advise(start: int, length: int, advice: int) -> bytes:
    return ADVISE.pack(MAGIC, MsgType.ADVISE, ADVISE.size, start, length, advice, 0)
