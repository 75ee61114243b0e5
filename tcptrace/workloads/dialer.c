/*
 * dialer: connects to a loopback port N times and (by default) keeps every
 * connection open: a client-side socket leak.
 *
 *   dialer --port P [--ipv6] [--count N] [--close] [--close-after-ready]
 *          [--hold S] [--delay-ms D]
 *
 * dial_one() does socket() + connect() to 127.0.0.1:P (or [::1]:P), and with
 * --close closes the socket right away (the correct pattern). --delay-ms
 * spaces the dials out. After all dials: `READY {json}` on stdout.
 *
 * --close-after-ready: keep the connections through READY, then close them
 * all (close_held()) and print `CLOSED {json}`; the accepting peer is left in
 * CLOSE_WAIT. SIGUSR1 also triggers close_held() at any time during the
 * hold, so a test decides when the peer sees the close.
 *
 * Exits 0 when the hold (default 5s, max 600s) ends or on SIGTERM/SIGINT.
 * Stack names: dial_one <- dial_all <- main; close_held <- main.
 */
#include "wlcommon.c"

#define MAX_COUNT 10000

static int held_fds[MAX_COUNT];
static int local_ports[MAX_COUNT];
static long n_held;
static int closed_all;

/* One connection to loopback `port`; closed at once if `close_now`.
 * Returns the local port, or -1 with errno set. */
WL_NOINLINE int dial_one(int port, int ipv6, int close_now)
{
    struct sockaddr_storage ss;
    socklen_t len = wl_loopback(ipv6, port, &ss);
    int fd = wl_socket(ipv6);
    if (fd < 0)
        return -1;
    if (wl_connect(fd, &ss, len) != 0) {
        int e = errno;
        wl_close(fd);
        errno = e;
        return -1;
    }
    int lport = wl_local_port(fd);
    if (close_now)
        wl_close(fd);
    else
        held_fds[n_held++] = fd; /* kept open */
    return lport;
}

/* Dial `count` times, `delay_s` apart. Returns 0, or -1 on a stop signal. */
WL_NOINLINE int dial_all(int port, int ipv6, long count, int close_now, double delay_s)
{
    for (long i = 0; i < count; i++) {
        int lport = dial_one(port, ipv6, close_now);
        if (lport < 0)
            wl_die(WL_EXIT_RUNTIME, "connect to %s port %d: %s", ipv6 ? "::1" : "127.0.0.1", port,
                   strerror(errno));
        local_ports[i] = lport;
        if (delay_s > 0 && i + 1 < count) {
            double until = wl_now() + delay_s;
            double left;
            while ((left = until - wl_now()) > 0) {
                if (wl_is_stop(wl_wait(left, -1, NULL)))
                    return -1;
            }
        } else if (wl_is_stop(wl_poll_signal())) {
            return -1;
        }
    }
    return 0;
}

/* Close every held connection (once) and report it. */
WL_NOINLINE void close_held(void)
{
    if (closed_all)
        return;
    for (long i = 0; i < n_held; i++)
        wl_close(held_fds[i]);
    closed_all = 1;
    struct wl_buf b = {0};
    wl_bprintf(&b, "{\"pid\":%d,\"closed\":%ld}", (int)getpid(), n_held);
    wl_emit("CLOSED", b.s);
    free(b.s);
}

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        close_held();
}

static void usage(void)
{
    wl_die(WL_EXIT_USAGE, "usage: dialer --port P [--ipv6] [--count N] [--close] "
                          "[--close-after-ready] [--hold S] [--delay-ms D]");
}

int main(int argc, char **argv)
{
    long port = -1, count = 1, delay_ms = 0;
    int ipv6 = 0, close_now = 0, close_after_ready = 0;
    double hold = 5.0;
    wl_signals_init("dialer");
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = wl_optval(argc, argv, &i, "--port")))
            port = wl_parse_long("--port", v, 1, 65535);
        else if ((v = wl_optval(argc, argv, &i, "--count")))
            count = wl_parse_long("--count", v, 0, MAX_COUNT);
        else if ((v = wl_optval(argc, argv, &i, "--delay-ms")))
            delay_ms = wl_parse_long("--delay-ms", v, 0, 10000);
        else if ((v = wl_optval(argc, argv, &i, "--hold")))
            hold = wl_parse_duration("--hold", v, WL_MAX_HOLD_S);
        else if (strcmp(argv[i], "--ipv6") == 0)
            ipv6 = 1;
        else if (strcmp(argv[i], "--close") == 0)
            close_now = 1;
        else if (strcmp(argv[i], "--close-after-ready") == 0)
            close_after_ready = 1;
        else
            usage();
    }
    if (port < 0)
        usage();
    if (close_now && close_after_ready)
        wl_die(WL_EXIT_USAGE, "--close and --close-after-ready exclude each other");
    if ((double)count * (double)delay_ms / 1000.0 > WL_MAX_HOLD_S)
        wl_die(WL_EXIT_USAGE, "--count x --delay-ms is above %gs", WL_MAX_HOLD_S);
    wl_raise_nofile();

    if (dial_all((int)port, ipv6, count, close_now, (double)delay_ms / 1000.0) != 0)
        return 0; /* stop signal */

    struct wl_buf b = {0};
    wl_bprintf(&b,
               "{\"pid\":%d,\"port\":%ld,\"family\":\"%s\",\"count\":%ld,\"closed\":%s,"
               "\"fds\":",
               (int)getpid(), port, ipv6 ? "ipv6" : "ipv4", count, close_now ? "true" : "false");
    wl_bints(&b, held_fds, n_held);
    wl_bprintf(&b, ",\"local_ports\":");
    wl_bints(&b, local_ports, count);
    wl_bprintf(&b, ",\"hold_s\":%g}", hold);
    wl_emit("READY", b.s);
    free(b.s);

    double deadline = wl_now() + hold;
    if (close_after_ready)
        close_held();
    wl_hold_until(deadline, on_signal);
    return 0;
}
