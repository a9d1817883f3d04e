"""The one size grammar of umgr: command line, config file and shim.

    size := NUMBER [UNIT ["i"]] ["B"]      case-insensitive, no inner spaces
    NUMBER := DIGITS ["." 1 to 9 DIGITS]
    UNIT := K | M | G | T | P              powers of 1024

`512M`, `1.5G`, `4096`, `64KiB` and `2gb` are sizes; the fraction of a byte
is dropped. A size must be at least its minimum (one page unless said
otherwise) and below 2^63 bytes. Negative numbers, `inf`, `nan`, exponents
and anything else are refused with one line that says why.

The shim parses UMGR_MAX_RESIDENT and UMGR_MIN_REGION with the same grammar
(bindings/shim/size.h); tests/test_sizes.py runs one table of cases through
both.
"""
from __future__ import annotations

import re

from umgr.kernel import PAGE_SIZE

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
LIMIT = 1 << 63                  # sizes go to the daemon as 64-bit fields
MAX_FRACTION_DIGITS = 9
SPACE = " \t\n\v\f\r"            # C's isspace(): the shim trims the same set
_SIZE = re.compile(r"([0-9]+)(?:\.([0-9]+))?(?:([KMGTP])(I?))?(B?)", re.ASCII | re.IGNORECASE)
EXAMPLE = "e.g. 512M, 1.5G or 4096"


class SizeError(ValueError):
    """A size that is refused; str() is the one line to show."""


def parse_size(text: str, minimum: int = PAGE_SIZE) -> int:
    """Bytes for `text` in the grammar above; SizeError if it is not one,
    or is under `minimum` bytes."""
    stripped = text.strip(SPACE)
    match = _SIZE.fullmatch(stripped)
    if not match:
        why = "negative" if stripped.startswith("-") else "not a size"
        raise SizeError(f"{text!r} is {why} ({EXAMPLE})")
    whole, fraction, unit, _binary, _bytes = match.groups()
    fraction = fraction or ""
    if len(whole.lstrip("0")) > 19:  # 10^19 > 2^63
        raise SizeError(f"{text!r} is too large (the limit is 8E - 1 bytes)")
    if len(fraction) > MAX_FRACTION_DIGITS:
        raise SizeError(f"{text!r} has more than {MAX_FRACTION_DIGITS} decimals")
    scale = 10 ** len(fraction)
    value = (int(whole) * scale + int(fraction or "0")) * UNITS[(unit or "").upper()] // scale
    if value >= LIMIT:
        raise SizeError(f"{text!r} is too large (the limit is 8E - 1 bytes)")
    if value < minimum:
        raise SizeError(f"{text!r} is {'zero' if value == 0 else 'too small'}: "
                        f"the least is {format_size(minimum)}")
    return value


def format_size(nbytes: float) -> str:
    """A short human-readable size in the same units, rounded down (never
    more than there is): 0, 4K, 1.5G, 512M, 3.9K for 4095."""
    for unit in "PTGMK":
        scale = UNITS[unit]
        if nbytes >= scale:
            tenths = int(nbytes * 10 // scale)
            text = f"{tenths // 10}.{tenths % 10}" if tenths < 1000 else str(tenths // 10)
            return text.removesuffix(".0") + unit
    return str(int(nbytes))
