/*
 * accept_server: a loopback TCP server that accepts connections and never
 * closes them (a server-side socket leak; once a peer closes, the accepted
 * socket sits in CLOSE_WAIT).
 *
 *   accept_server --port P [--ipv6] [--count N] [--hold S]
 *
 * --port 0 picks an ephemeral port (reported in READY). serve_forever()
 * accepts up to N connections (default 100, max 10000) until the hold time
 * ends; each one is taken by accept_one(), which calls accept(fd, NULL, NULL)
 * (no peer address, on purpose) and keeps the fd forever.
 *
 * stdout: `READY {json}` once listening; `ACCEPTED {json}` when N connections
 * have been accepted. Exits 0 when the hold (default 5s, max 600s) ends or on
 * SIGTERM/SIGINT.
 *
 * Stack names: accept_one <- serve_forever <- main.
 */
#include "wlcommon.c"

#define MAX_COUNT 10000

static int accepted_fds[MAX_COUNT];
static long n_accepted;

/* Accept one connection with a NULL peer address and keep its fd forever. */
WL_NOINLINE int accept_one(int lfd)
{
    int fd = wl_accept(lfd); /* accept(lfd, NULL, NULL) */
    if (fd >= 0)
        accepted_fds[n_accepted++] = fd; /* never closed */
    return fd;
}

/* Accept up to `count` connections before `deadline`; -1 on a stop signal. */
WL_NOINLINE long serve_forever(int lfd, long count, double deadline)
{
    while (n_accepted < count) {
        double left = deadline - wl_now();
        if (left <= 0)
            break;
        int ready = 0;
        int sig = wl_wait(left, lfd, &ready);
        if (wl_is_stop(sig))
            return -1;
        if (!ready)
            continue;
        /* One accept per readiness report, so accept() does not fail with
         * EAGAIN in the normal case. */
        if (accept_one(lfd) < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
            errno != ECONNABORTED && errno != EINTR)
            wl_die(WL_EXIT_RUNTIME, "accept: %s", strerror(errno));
    }
    return n_accepted;
}

static void usage(void)
{
    wl_die(WL_EXIT_USAGE, "usage: accept_server --port P [--ipv6] [--count N] [--hold S]");
}

int main(int argc, char **argv)
{
    long port = -1, count = 100;
    int ipv6 = 0;
    double hold = 5.0;
    wl_signals_init("accept_server");
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = wl_optval(argc, argv, &i, "--port")))
            port = wl_parse_long("--port", v, 0, 65535);
        else if ((v = wl_optval(argc, argv, &i, "--count")))
            count = wl_parse_long("--count", v, 0, MAX_COUNT);
        else if ((v = wl_optval(argc, argv, &i, "--hold")))
            hold = wl_parse_duration("--hold", v, WL_MAX_HOLD_S);
        else if (strcmp(argv[i], "--ipv6") == 0)
            ipv6 = 1;
        else
            usage();
    }
    if (port < 0)
        usage();
    wl_raise_nofile();

    int bound = 0;
    int backlog = count > 128 ? (int)count : 128;
    int lfd = wl_listen(ipv6, (int)port, backlog, 1, &bound);

    struct wl_buf b = {0};
    wl_bprintf(&b,
               "{\"pid\":%d,\"port\":%d,\"family\":\"%s\",\"addr\":\"%s\",\"count\":%ld,"
               "\"listen_fd\":%d,\"hold_s\":%g}",
               (int)getpid(), bound, ipv6 ? "ipv6" : "ipv4", ipv6 ? "::1" : "127.0.0.1", count,
               lfd, hold);
    wl_emit("READY", b.s);

    double deadline = wl_now() + hold;
    long n = serve_forever(lfd, count, deadline);
    if (n < 0)
        return 0; /* stop signal */
    if (n >= count && count > 0) {
        int peer_ports[MAX_COUNT];
        for (long i = 0; i < n; i++) {
            struct sockaddr_storage ss;
            socklen_t len = sizeof ss;
            peer_ports[i] = -1;
            if (getpeername(accepted_fds[i], (struct sockaddr *)&ss, &len) == 0)
                peer_ports[i] = ntohs(ss.ss_family == AF_INET6
                                          ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
        }
        b.len = 0;
        wl_bprintf(&b, "{\"pid\":%d,\"accepted\":%ld,\"fds\":", (int)getpid(), n);
        wl_bints(&b, accepted_fds, n);
        wl_bprintf(&b, ",\"peer_ports\":");
        wl_bints(&b, peer_ports, n);
        wl_bprintf(&b, "}");
        wl_emit("ACCEPTED", b.s);
    }
    wl_hold_until(deadline, NULL);
    free(b.s);
    return 0;
}
