/*
 * wlcommon.c: helpers shared by tcptrace's C workloads. It is not a program:
 * each workload does `#include "wlcommon.c"` so every binary is built from a
 * single gcc invocation (see build.py, which hashes this file too).
 *
 * Build flags: -O1 -g -fno-omit-frame-pointer, so user stacks can be walked
 * by frame pointer.
 *
 * Why the wl_socket/wl_connect/wl_accept/wl_close shims exist: glibc's
 * syscall wrappers (accept, connect, socket, close) are leaf functions
 * without a frame of their own. When a frame-pointer unwinder samples the
 * user stack inside one, it reports the wrapper (from the instruction
 * pointer) and then continues from the *caller's* saved frame pointer, so
 * the wrapper's direct caller never shows up. Routing every socket syscall
 * through one small non-inlined shim means the function the tests name
 * (accept_one, dial_one, connect_refused, churn_connect) is always a
 * visible frame; the shim itself is the frame that gets skipped.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#if defined(__clang__)
#define WL_NOINLINE __attribute__((noinline, used))
#else
/* noipa: no inlining, cloning or interprocedural rewriting, so the symbol
 * keeps its plain name (no .isra/.constprop suffix) in stack traces. */
#define WL_NOINLINE __attribute__((noipa, used))
#endif
#define WL_UNUSED __attribute__((unused))
/* An empty asm after a call keeps that call from becoming a tail call, which
 * would drop the calling frame from the stack. */
#define WL_NOT_TAIL() __asm__ volatile("" ::: "memory")

#define WL_MAX_HOLD_S 600.0 /* no workload may run for more than 10 minutes */
#define WL_EXIT_USAGE 2
#define WL_EXIT_RUNTIME 1

static const char *wl_prog = "workload";
static int wl_sigfd = -1;

WL_UNUSED static void wl_die(int code, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", wl_prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

WL_UNUSED static double wl_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* "5", "2.5", "5s", "500ms", "1m" -> seconds; rejects negatives and > max. */
WL_UNUSED static double wl_parse_duration(const char *opt, const char *s, double max_s)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s)
        wl_die(WL_EXIT_USAGE, "%s: bad duration '%s'", opt, s);
    if (strcmp(end, "ms") == 0)
        v /= 1000.0;
    else if (strcmp(end, "m") == 0)
        v *= 60.0;
    else if (strcmp(end, "s") != 0 && *end != '\0')
        wl_die(WL_EXIT_USAGE, "%s: bad duration '%s' (use 5, 2.5s, 500ms)", opt, s);
    if (!(v >= 0.0))
        wl_die(WL_EXIT_USAGE, "%s: duration '%s' is negative", opt, s);
    if (v > max_s)
        wl_die(WL_EXIT_USAGE, "%s: duration '%s' is above the maximum of %gs", opt, s, max_s);
    return v;
}

WL_UNUSED static long wl_parse_long(const char *opt, const char *s, long lo, long hi)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0')
        wl_die(WL_EXIT_USAGE, "%s: bad integer '%s'", opt, s);
    if (v < lo || v > hi)
        wl_die(WL_EXIT_USAGE, "%s: %ld is outside %ld..%ld", opt, v, lo, hi);
    return v;
}

/* Option value of argv[*i] ("--opt VALUE" or "--opt=VALUE"), or NULL if
 * argv[*i] is not `name`. */
WL_UNUSED static const char *wl_optval(int argc, char **argv, int *i, const char *name)
{
    size_t n = strlen(name);
    const char *a = argv[*i];
    if (strncmp(a, name, n) != 0)
        return NULL;
    if (a[n] == '=')
        return a + n + 1;
    if (a[n] != '\0')
        return NULL;
    if (*i + 1 >= argc)
        wl_die(WL_EXIT_USAGE, "%s needs a value", name);
    *i += 1;
    return argv[*i];
}

/* Block SIGTERM/SIGINT/SIGHUP/SIGUSR1 (threads created later inherit the
 * mask) and receive them through a signalfd instead, so waits are race-free. */
WL_UNUSED static void wl_signals_init(const char *prog)
{
    wl_prog = prog;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
        wl_die(WL_EXIT_RUNTIME, "sigprocmask: %s", strerror(errno));
    wl_sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (wl_sigfd < 0)
        wl_die(WL_EXIT_RUNTIME, "signalfd: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);
}

/* A pending signal (SIGTERM, ...) or 0, without blocking. */
WL_UNUSED static int wl_poll_signal(void)
{
    struct signalfd_siginfo si;
    ssize_t n = read(wl_sigfd, &si, sizeof si);
    if (n == (ssize_t)sizeof si)
        return (int)si.ssi_signo;
    return 0;
}

/* Wait up to timeout_s for a signal or for `fd` (if >= 0) to become readable.
 * Returns the signal number, or 0 (timeout or fd readable: *fd_ready says). */
WL_UNUSED static int wl_wait(double timeout_s, int fd, int *fd_ready)
{
    if (fd_ready)
        *fd_ready = 0;
    if (timeout_s < 0)
        timeout_s = 0;
    struct pollfd p[2] = {{.fd = wl_sigfd, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
    int ms = (int)(timeout_s * 1000.0 + 0.999);
    int r = poll(p, fd >= 0 ? 2 : 1, ms);
    if (r < 0)
        return 0; /* EINTR etc: the caller re-checks its deadline */
    if (p[0].revents & POLLIN) {
        int s = wl_poll_signal();
        if (s)
            return s;
    }
    if (fd >= 0 && (p[1].revents & (POLLIN | POLLERR | POLLHUP)) && fd_ready)
        *fd_ready = 1;
    return 0;
}

/* True for the signals that end a workload (SIGUSR1 is a program "event"). */
WL_UNUSED static int wl_is_stop(int sig)
{
    return sig == SIGTERM || sig == SIGINT || sig == SIGHUP;
}

/* Hold until `deadline` (monotonic seconds) or a stop signal. Other signals
 * are passed to `on_other` (may be NULL). */
WL_UNUSED static void wl_hold_until(double deadline, void (*on_other)(int))
{
    for (;;) {
        double left = deadline - wl_now();
        if (left <= 0)
            return;
        int s = wl_wait(left, -1, NULL);
        if (wl_is_stop(s))
            return;
        if (s && on_other)
            on_other(s);
    }
}

/* Sockets can take many fds: raise the soft RLIMIT_NOFILE to the hard one. */
WL_UNUSED static void wl_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Loopback only: 127.0.0.1 or ::1. */
WL_UNUSED static socklen_t wl_loopback(int ipv6, int port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (ipv6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        a->sin6_addr = in6addr_loopback;
        return sizeof *a;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sizeof *a;
}

WL_UNUSED static int wl_local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return -1;
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

/* ---- syscall shims (see the comment at the top) ---- */

WL_NOINLINE int wl_socket(int ipv6)
{
    int fd = socket(ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    WL_NOT_TAIL();
    return fd;
}

WL_NOINLINE int wl_connect(int fd, const struct sockaddr_storage *ss, socklen_t len)
{
    int r = connect(fd, (const struct sockaddr *)ss, len);
    WL_NOT_TAIL();
    return r;
}

/* accept(fd, NULL, NULL): no peer address on purpose, so a tracer cannot
 * rely on the syscall's sockaddr argument. */
WL_NOINLINE int wl_accept(int fd)
{
    int r = accept(fd, NULL, NULL);
    WL_NOT_TAIL();
    return r;
}

WL_NOINLINE int wl_close(int fd)
{
    int r = close(fd);
    WL_NOT_TAIL();
    return r;
}

/* A listening TCP socket on loopback `port` (0 = ephemeral); returns the fd
 * and stores the bound port in *bound. Exits on error. */
WL_UNUSED static int wl_listen(int ipv6, int port, int backlog, int nonblock, int *bound)
{
    int fd = socket(ipv6 ? AF_INET6 : AF_INET,
                    SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        wl_die(WL_EXIT_RUNTIME, "socket: %s", strerror(errno));
    int one = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ipv6)
        (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    struct sockaddr_storage ss;
    socklen_t len = wl_loopback(ipv6, port, &ss);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0)
        wl_die(WL_EXIT_RUNTIME, "bind %s port %d: %s", ipv6 ? "::1" : "127.0.0.1", port,
               strerror(errno));
    if (listen(fd, backlog) != 0)
        wl_die(WL_EXIT_RUNTIME, "listen: %s", strerror(errno));
    *bound = wl_local_port(fd);
    return fd;
}

/* Print a `TAG {json}` line and flush it (stdout may be a pipe). */
WL_UNUSED static void wl_emit(const char *tag, const char *json)
{
    printf("%s %s\n", tag, json);
    fflush(stdout);
}

/* A tiny append-only string buffer for building JSON. */
struct wl_buf {
    char *s;
    size_t len, cap;
};

WL_UNUSED static void wl_bprintf(struct wl_buf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->s ? b->s + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0)
            wl_die(WL_EXIT_RUNTIME, "vsnprintf failed");
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap - b->len <= (size_t)n)
            cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s)
            wl_die(WL_EXIT_RUNTIME, "out of memory");
        b->s = s;
        b->cap = cap;
    }
}

/* Append `[a, b, c]` of ints. */
WL_UNUSED static void wl_bints(struct wl_buf *b, const int *v, long n)
{
    wl_bprintf(b, "[");
    for (long i = 0; i < n; i++)
        wl_bprintf(b, i ? ",%d" : "%d", v[i]);
    wl_bprintf(b, "]");
}
