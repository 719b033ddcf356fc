/* Crash points for imgbackup's crash-consistency test: an LD_PRELOAD shim
 * that counts every rename, fsync and unlink the process makes and kills
 * the process (SIGKILL, nothing runs after it) just before call number
 * $CRASH_AT. With $CRASH_LOG set, each call is appended to that file as
 * "N name", so a first run can count them. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static atomic_long calls;

static void tick(const char *what)
{
    long n = atomic_fetch_add(&calls, 1) + 1;
    const char *log = getenv("CRASH_LOG");
    if (log) {
        int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0) {
            dprintf(fd, "%ld %s\n", n, what);
            close(fd);
        }
    }
    const char *at = getenv("CRASH_AT");
    if (at && atol(at) == n)
        raise(SIGKILL);
}

#define WRAP(ret, name, params, args)                                      \
    ret name params                                                        \
    {                                                                      \
        static ret(*real) params;                                          \
        if (!real)                                                         \
            real = (ret(*) params)dlsym(RTLD_NEXT, #name);                 \
        tick(#name);                                                       \
        return real args;                                                  \
    }

WRAP(int, rename, (const char *a, const char *b), (a, b))
WRAP(int, renameat, (int da, const char *a, int db, const char *b), (da, a, db, b))
WRAP(int, renameat2, (int da, const char *a, int db, const char *b, unsigned f),
     (da, a, db, b, f))
WRAP(int, fsync, (int fd), (fd))
WRAP(int, fdatasync, (int fd), (fd))
WRAP(int, unlink, (const char *p), (p))
WRAP(int, unlinkat, (int d, const char *p, int f), (d, p, f))
