/* umgr control protocol: shim <-> daemon.
 *
 * Transport: AF_UNIX SOCK_SEQPACKET, so every message arrives whole or not at
 * all. Each message starts with struct umgr_hdr; `size` is the whole message.
 * umgr/protocol.py mirrors these layouts with struct formats: change both.
 *
 * Connection 1 (control): the shim connects to UMGR_SOCKET and sends HELLO
 * with two descriptors (SCM_RIGHTS): its userfaultfd (UFFDIO_API not yet
 * called: it needs CAP_SYS_PTRACE for EVENT_FORK, so the daemon calls it) and
 * one end of a socketpair for the zap agent. The daemon answers HELLO_ACK.
 * Before it answers, the daemon checks the connecting process's ids and
 * proves the uffd is its own through the HELLO's probe page.
 * Then REGION / ADVISE requests, each answered by an ACK with a status
 * (0 or a positive errno). ADVISE with an unknown advice is answered EINVAL,
 * not dropped.
 *
 * Connection 2 (agent): the socketpair. The daemon sends ZAP (a list of
 * ranges); the agent thread zaps them with one vectored
 * process_madvise(MADV_DONTNEED) on its own process and answers ZAP_DONE.
 * MOVE_OUT carries ranges the same way: the agent moves their pages out
 * with UFFDIO_MOVE into a scratch area of its own, registered on the app's
 * uffd, and discards them there while it is unregistered, so no REMOVE
 * event reaches the daemon; ZAP_DONE says how much moved, from the start, and the
 * errno that stopped the move (the daemon zaps the rest, unless it was
 * ENOENT: a mapping gone). After the ranges, a MOVE_OUT carries one
 * uint64_t per page of them, in order: umgr_page_hash (pagehash.h) of the
 * copy the daemon made, or 0 for a page it did not copy. The agent hashes
 * each page it moved again: one a device wrote in between (pinned for I/O
 * before the daemon write-protected it, unpinned before the move) differs,
 * and its content goes to the agent's changed-page area for the daemon to
 * read before its next MOVE_OUT (ZAP_DONE's changed, changed_at). That
 * area holds UMGR_CHANGED_MAX pages: a move that could find more changed
 * pages than it has room for left stops before them (ENOSPC).
 * The daemon reads no event from the app's uffd
 * while a move is in flight, so an mremap in between cannot move pages
 * back under it. Requests are answered in order: an empty ZAP (count 0) is
 * answered once every zap before it, on this socket or on one of a daemon
 * that died, is done.
 * When the daemon stops cleanly it first brings every page back, then sends
 * DETACH: the shim drops its uffd reference, answers DETACH_DONE and the
 * program runs on unmanaged. The agent socket closing without a DETACH
 * means the daemon is gone (README "If the daemon stops or dies").
 *
 * The shim keeps its own reference to its uffd (a forked child gets its
 * uffd, which the kernel created with the fork event, back with
 * HELLO_ACK as an SCM_RIGHTS descriptor), so a dead daemon leaves faults
 * blocked, never served as zeros.
 */
#ifndef UMGR_PROTOCOL_H
#define UMGR_PROTOCOL_H

#include <stdint.h>

/* enum umgr_advice, the values of umgr_advise.advice: the application's
   header defines them, the protocol carries them. Its weak declarations
   make the shim's umgr_advise/umgr_is_managed weak definitions, which the
   dynamic linker binds as it binds strong ones. */
#include "umgr.h"

#define UMGR_MAGIC 0x524d4755u /* "UGMR" little endian */
#define UMGR_VERSION 8 /* 2: HELLO names the process; 3: HELLO_ACK grows grace_seconds, DETACH;
                          4: HELLO's probe page; 5: HELLO's flags (RESUME), empty ZAP; 6: MOVE_OUT;
                          7: ZAP_DONE of a MOVE_OUT says why it stopped;
                          8: MOVE_OUT's page hashes, ZAP_DONE's changed pages */

enum umgr_msg_type {
    UMGR_HELLO = 1,
    UMGR_HELLO_ACK = 2,
    UMGR_REGION = 3,
    UMGR_ACK = 4,
    UMGR_ADVISE = 5,
    UMGR_FORKED = 6,    /* a struct umgr_region: start = the child pid, or 0: the last fork made no child to name */
    UMGR_ZAP = 16,
    UMGR_ZAP_DONE = 17,
    UMGR_DETACH = 18,
    UMGR_DETACH_DONE = 19,
    UMGR_MOVE_OUT = 20, /* a struct umgr_zap whose ranges the agent moves out (UFFDIO_MOVE); ZAP_DONE answers */
};

struct umgr_hdr {
    uint32_t magic;
    uint16_t type;
    uint16_t size;
};

struct umgr_hello {
    struct umgr_hdr hdr;
    uint32_t version;
    int32_t pid;
    uint64_t max_resident; /* bytes; 0 = the daemon's default */
    uint64_t min_region;   /* bytes; mappings below this are not managed */
    char policy[32];       /* prefetch policy name, NUL-terminated; "" = default */
    char name[64];         /* UMGR_NAME, the metrics label; "" = the daemon picks one */
    uint64_t probe;        /* an untouched private anonymous page: the daemon
                              fills it through the uffd and reads it back
                              through /proc/PID/mem to prove the uffd is ours;
                              then kept, unused, as the canary of its reads */
    uint32_t flags;        /* UMGR_HELLO_RESUME */
    uint32_t pad;
};

/* HELLO flag: the daemon that served this process died; a daemon restarted
 * with the same socket and state directory is asked to take it back, with
 * the uffd the dead one set up (UFFDIO_API is not called again) and a new
 * agent socket. Answered ESTALE when no state of the process was left. */
#define UMGR_HELLO_RESUME 1u

struct umgr_hello_ack {
    struct umgr_hdr hdr;
    int32_t status; /* 0 or a positive errno */
    uint32_t zap_mode; /* 1: agent zaps, 2: daemon zaps remotely */
    uint64_t features;
    uint32_t grace_seconds; /* how long a program waits for a lost daemon before it is killed */
    uint32_t pad;
};
/* HELLO_ACK status ENOENT to a forked child: no fork event came for it,
 * attach with a uffd of your own. ESHUTDOWN: the daemon is stopping and
 * takes no new process; run unmanaged (nothing of it was ever paged out). */

/* REGION: [start, start+length) is a new anonymous private mapping. */
struct umgr_region {
    struct umgr_hdr hdr;
    uint64_t start;
    uint64_t length;
};

struct umgr_advise {
    struct umgr_hdr hdr;
    uint64_t start;
    uint64_t length;
    uint32_t advice; /* enum umgr_advice; the daemon answers EINVAL to others */
    uint32_t pad;
};

struct umgr_ack {
    struct umgr_hdr hdr;
    int32_t status; /* 0 or a positive errno */
    uint32_t pad;
};

struct umgr_range {
    uint64_t start;
    uint64_t length;
};

#define UMGR_ZAP_MAX_RANGES 1024 /* UIO_MAXIOV */

struct umgr_zap {
    struct umgr_hdr hdr;
    uint32_t seq;
    uint32_t count;
    struct umgr_range ranges[]; /* count entries */
};

/* A MOVE_OUT names at most this many pages (the daemon's largest eviction
 * batch), so its hashes have a bound; at most UMGR_CHANGED_MAX of them are
 * answered as changed. */
#define UMGR_MOVE_MAX_PAGES 2048
#define UMGR_CHANGED_MAX 64

struct umgr_zap_done {
    struct umgr_hdr hdr;
    uint32_t seq;
    int32_t error;  /* 0 or a positive errno; for MOVE_OUT, negative: no move can be made here */
    int64_t bytes;  /* bytes zapped (or moved out), from the start of the list */
    /* MOVE_OUT: how many pages moved out differ from the daemon's copy, and
     * where in the agent's memory they are: `changed` uint32_t indices
     * (among the request's pages) at changed_at, their content, a page
     * each, at changed_at + UMGR_CHANGED_INDEX_BYTES. Valid until the next
     * MOVE_OUT. */
    uint32_t changed;
    uint32_t reserved;
    uint64_t changed_at;
};

#define UMGR_CHANGED_INDEX_BYTES 4096   /* a page: UMGR_CHANGED_MAX indices fit */

/* DETACH (daemon -> agent) and DETACH_DONE (agent -> daemon): a bare header. */
struct umgr_detach {
    struct umgr_hdr hdr;
};

#endif
