/*
 * failconnect: a connect() that fails (ECONNREFUSED) on a loopback port
 * where nothing listens, with the failed socket's fd kept open: a real fd
 * leak on a TCP socket that never left CLOSED.
 *
 *   failconnect [--ipv6] [--count N] [--hold S]
 *
 * The port is found by binding a socket to port 0, reading the port and
 * closing it again. connect_refused() does socket() + connect() and keeps the
 * fd. READY {json} gives the fd numbers ("fd" is the first), the port and the
 * errno. Exits 0 when the hold (default 5s, max 600s) ends or on
 * SIGTERM/SIGINT.
 *
 * Stack names: connect_refused <- main.
 */
#include "wlcommon.c"

#define MAX_COUNT 1000

/* A loopback port nobody listens on (bound, read back, released). */
static int unused_port(int ipv6)
{
    int fd = socket(ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        wl_die(WL_EXIT_RUNTIME, "socket: %s", strerror(errno));
    struct sockaddr_storage ss;
    socklen_t len = wl_loopback(ipv6, 0, &ss);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0)
        wl_die(WL_EXIT_RUNTIME, "bind: %s", strerror(errno));
    int port = wl_local_port(fd);
    close(fd);
    return port;
}

/* socket() + connect() to a port with no listener; the fd is returned (and
 * deliberately never closed). Returns -1 if the connect unexpectedly worked
 * (someone grabbed the port), with that socket closed. */
WL_NOINLINE int connect_refused(int ipv6, int port, int *err)
{
    struct sockaddr_storage ss;
    socklen_t len = wl_loopback(ipv6, port, &ss);
    int fd = wl_socket(ipv6);
    if (fd < 0)
        wl_die(WL_EXIT_RUNTIME, "socket: %s", strerror(errno));
    if (wl_connect(fd, &ss, len) == 0) {
        wl_close(fd);
        return -1;
    }
    *err = errno;
    return fd; /* leaked: never closed */
}

static void usage(void)
{
    wl_die(WL_EXIT_USAGE, "usage: failconnect [--ipv6] [--count N] [--hold S]");
}

int main(int argc, char **argv)
{
    long count = 1;
    int ipv6 = 0;
    double hold = 5.0;
    wl_signals_init("failconnect");
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = wl_optval(argc, argv, &i, "--count")))
            count = wl_parse_long("--count", v, 1, MAX_COUNT);
        else if ((v = wl_optval(argc, argv, &i, "--hold")))
            hold = wl_parse_duration("--hold", v, WL_MAX_HOLD_S);
        else if (strcmp(argv[i], "--ipv6") == 0)
            ipv6 = 1;
        else
            usage();
    }

    int fds[MAX_COUNT], ports[MAX_COUNT];
    int err = 0;
    for (long i = 0; i < count; i++) {
        int fd = -1;
        for (int attempt = 0; attempt < 10 && fd < 0; attempt++) {
            ports[i] = unused_port(ipv6);
            fd = connect_refused(ipv6, ports[i], &err);
        }
        if (fd < 0)
            wl_die(WL_EXIT_RUNTIME, "could not find a loopback port without a listener");
        if (err != ECONNREFUSED)
            wl_die(WL_EXIT_RUNTIME, "connect: expected ECONNREFUSED, got %s", strerror(err));
        fds[i] = fd;
    }

    struct wl_buf b = {0};
    wl_bprintf(&b, "{\"pid\":%d,\"fd\":%d,\"port\":%d,\"family\":\"%s\",\"errno\":%d,"
                   "\"error\":\"ECONNREFUSED\",\"count\":%ld,\"fds\":",
               (int)getpid(), fds[0], ports[0], ipv6 ? "ipv6" : "ipv4", err, count);
    wl_bints(&b, fds, count);
    wl_bprintf(&b, ",\"ports\":");
    wl_bints(&b, ports, count);
    wl_bprintf(&b, ",\"hold_s\":%g}", hold);
    wl_emit("READY", b.s);
    free(b.s);

    wl_hold_until(wl_now() + hold, NULL);
    return 0;
}
