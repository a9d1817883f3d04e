/* This process's resident set in KiB (VmRSS of /proc/self/status), -1 if
 * unknown: test programs print it so tests can check it against a budget. */
#ifndef UMGR_TEST_RSS_H
#define UMGR_TEST_RSS_H

#include <stdio.h>

static inline long rss_kb(void)
{
    long kb = -1;
    char line[256];
    FILE *status = fopen("/proc/self/status", "r");
    while (status && fgets(line, sizeof line, status))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1)
            break;
    if (status)
        fclose(status);
    return kb;
}

#endif
