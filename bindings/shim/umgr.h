/* umgr application hints: the header an application includes.
 *
 * umgr_advise() lives in the LD_PRELOAD shim (libumgr_preload), so it is
 * declared weak: linked without the shim, the program still builds and runs,
 * and umgr_hint() then fails with ENOSYS instead of crashing.
 *
 *   #include "umgr.h"
 *   umgr_hint(buf, len, UMGR_ADVISE_COLD);
 *
 * Returns 0, or -1 with errno: EINVAL (unknown advice, addr not page
 * aligned), ENOMEM (part of the range is not managed by umgr; the rest is
 * advised), ENOTCONN (the shim is loaded but no daemon manages this process),
 * ETIMEDOUT (the daemon did not answer in time: UMGR_ACK_TIMEOUT_SECONDS,
 * default 30; the hint may still take effect), ENOSYS (no shim). Semantics in README "Hints".
 */
#ifndef UMGR_H
#define UMGR_H

#include <errno.h>
#include <stddef.h>

/* The shim's protocol.h includes this header: these values are the
   protocol's too (and umgr.hints' in Python). */
enum umgr_advice {
    UMGR_ADVISE_COLD = 1,        /* evict soon, whatever the budget */
    UMGR_ADVISE_WILLNEED = 2,    /* bring swapped pages in now, asynchronously */
    UMGR_ADVISE_DISCARDABLE = 3, /* may be dropped instead of written out (reads as zero then) */
};

extern int umgr_advise(void *addr, size_t length, int advice) __attribute__((weak));
extern int umgr_is_managed(void) __attribute__((weak));

static inline int umgr_hint(void *addr, size_t length, int advice)
{
    if (!umgr_advise) {
        errno = ENOSYS;
        return -1;
    }
    return umgr_advise(addr, length, advice);
}

#endif
