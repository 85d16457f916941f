/* Emulate a slower disk for a benchmark run: every fsync() and fdatasync() of
 * the processes it is preloaded into first sleeps SLOWSYNC_US microseconds
 * (default 2000), then flushes as usual. Nothing else changes.
 *
 *   gcc -shared -fPIC -O2 -o /tmp/slowdisk.so bench/slowdisk.c -ldl
 *   LD_PRELOAD=/tmp/slowdisk.so SLOWSYNC_US=2000 .venv/bin/python -m bench.gateway_scenarios relay
 *
 * Used for the "slower disk" rows of bench/RESULTS.md; see bench/README.md.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void slow_down(void)
{
    const char *setting = getenv("SLOWSYNC_US");
    long us = setting ? atol(setting) : 2000;
    struct timespec pause = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&pause, NULL);
}

int fdatasync(int fd)
{
    static int (*real)(int) = NULL;
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow_down();
    return real(fd);
}

int fsync(int fd)
{
    static int (*real)(int) = NULL;
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow_down();
    return real(fd);
}
