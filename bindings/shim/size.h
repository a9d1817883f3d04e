/* The size grammar of umgr/sizes.py, for the shim's environment variables:
 *
 *     size := NUMBER [UNIT ["i"]] ["B"]    case-insensitive, no inner spaces
 *     NUMBER := DIGITS ["." 1 to 9 DIGITS]
 *     UNIT := K | M | G | T | P            powers of 1024
 *
 * Leading and trailing isspace() are ignored, a fraction of a byte is
 * dropped, and a size must be at least `minimum` and below 2^63.
 * tests/test_sizes.py runs one table of cases through this and the Python
 * parser. */
#ifndef UMGR_SIZE_H
#define UMGR_SIZE_H

#include <ctype.h>
#include <stdint.h>

#define UMGR_SIZE_MAX_FRACTION_DIGITS 9

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int unit_shift(char c)
{
    switch (c) {
    case 'k': case 'K': return 10;
    case 'm': case 'M': return 20;
    case 'g': case 'G': return 30;
    case 't': case 'T': return 40;
    case 'p': case 'P': return 50;
    default: return -1;
    }
}

/* 0 and *bytes set, or -1 for text that is not a size of at least minimum. */
static int umgr_parse_size(const char *text, uint64_t minimum, uint64_t *bytes)
{
    const char *p = text;
    while (isspace((unsigned char)*p))
        p++;
    if (!is_digit(*p))
        return -1;
    /* 10^19 > 2^63: more significant digits than that is too large. */
    unsigned __int128 whole = 0;
    int significant = 0;
    for (; is_digit(*p); p++) {
        if (significant || *p != '0')
            significant++;
        if (significant > 19)
            return -1;
        whole = whole * 10 + (unsigned)(*p - '0');
    }
    unsigned __int128 fraction = 0, scale = 1;
    if (*p == '.') {
        p++;
        if (!is_digit(*p))
            return -1;
        for (int n = 0; is_digit(*p); p++, n++) {
            if (n == UMGR_SIZE_MAX_FRACTION_DIGITS)
                return -1;
            fraction = fraction * 10 + (unsigned)(*p - '0');
            scale *= 10;
        }
    }
    int shift = unit_shift(*p);
    if (shift < 0) {
        shift = 0;
    } else {
        p++;
        if (*p == 'i' || *p == 'I')
            p++;
    }
    if (*p == 'b' || *p == 'B')
        p++;
    while (isspace((unsigned char)*p))
        p++;
    if (*p)
        return -1;
    unsigned __int128 value = ((whole * scale + fraction) << shift) / scale;
    if (value >= ((unsigned __int128)1 << 63) || value < minimum)
        return -1;
    *bytes = (uint64_t)value;
    return 0;
}

#endif
