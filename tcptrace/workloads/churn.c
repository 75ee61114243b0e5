/*
 * churn: a load generator of short, correctly closed loopback connections,
 * to measure tracer overhead and to check nothing is reported as leaked.
 *
 *   churn [--connections N] [--rate R[/s]] [--ports K] [--rst] [--seconds S]
 *         [--threads T] [--ipv6] [--cpu C] [--start-delay-ms D]
 *
 * It listens on K loopback ports (default 8, max 64; several destination
 * ports so TIME_WAIT entries do not cap the rate); one accept thread
 * (churn_accept) accepts and closes every connection. T client threads
 * (default 1, max 64) run churn_connect: socket() + connect() + close(). With
 * --rst the client sets SO_LINGER {1, 0} and closes with an RST, so it leaves
 * no TIME_WAIT. --rate paces the clients to R connections/s overall (default:
 * unthrottled).
 *
 * Bounded by N connections (default 10000 unless only --seconds is given)
 * and by S seconds (default 60, max 600). Prints `READY {json}` once the
 * listeners exist (the load starts D ms later, default 0), then at the end
 * `DONE {"connections": n, "accepted": a, "seconds": s, "rate": r, ...}`.
 * SIGTERM/SIGINT stop the load early (DONE is still printed, exit 0).
 *
 * Stack names: churn_connect <- client_thread; churn_accept <- accept_thread.
 */
#include "wlcommon.c"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/epoll.h>

#define MAX_PORTS 64
#define MAX_THREADS 64
#define MAX_CONNECTIONS 1000000000L

static struct {
    long connections;
    double rate;
    int nports, rst, threads, ipv6;
} cfg = {10000, 0.0, 8, 0, 1, 0};

static int listen_fds[MAX_PORTS];
static int ports[MAX_PORTS];
static double t_start, t_deadline;

static atomic_long next_index; /* connection slots claimed by clients */
static atomic_long n_connected;
static atomic_long n_failed;
static atomic_long n_accepted;
static atomic_int last_error;
static atomic_int stop_clients;
static atomic_int clients_done;
static atomic_int stop_accept;

/* One short connection: socket, connect, close (RST with --rst).
 * Returns 0 or the connect errno. */
WL_NOINLINE int churn_connect(int port)
{
    struct sockaddr_storage ss;
    socklen_t len = wl_loopback(cfg.ipv6, port, &ss);
    int fd = wl_socket(cfg.ipv6);
    if (fd < 0)
        return errno;
    if (cfg.rst) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    int err = wl_connect(fd, &ss, len) == 0 ? 0 : errno;
    wl_close(fd);
    return err;
}

static void sleep_until(double t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static double finish_time[MAX_THREADS]; /* when each client thread ended */

static void *client_thread(void *arg)
{
    double *finished = arg;
    for (;;) {
        if (atomic_load_explicit(&stop_clients, memory_order_relaxed))
            break;
        long i = atomic_fetch_add_explicit(&next_index, 1, memory_order_relaxed);
        if (i >= cfg.connections)
            break;
        if (cfg.rate > 0) {
            /* Pace all threads together: slot i starts at t_start + i / rate.
             * Sleep in short steps so a stop request is seen promptly. */
            double due = t_start + (double)i / cfg.rate;
            double now;
            while ((now = wl_now()) < due && !atomic_load(&stop_clients))
                sleep_until(due - now > 0.05 ? now + 0.05 : due);
        }
        if (wl_now() >= t_deadline || atomic_load_explicit(&stop_clients, memory_order_relaxed)) {
            atomic_store(&stop_clients, 1);
            break;
        }
        int err = churn_connect(ports[i % cfg.nports]);
        if (err == 0) {
            atomic_fetch_add_explicit(&n_connected, 1, memory_order_relaxed);
        } else {
            atomic_fetch_add_explicit(&n_failed, 1, memory_order_relaxed);
            atomic_store(&last_error, err);
            /* e.g. EADDRNOTAVAIL when ephemeral ports run out: back off. */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }
    *finished = wl_now();
    atomic_fetch_add(&clients_done, 1);
    return NULL;
}

/* Accept and close everything pending on one listener. */
WL_NOINLINE long churn_accept(int lfd)
{
    long n = 0;
    for (int k = 0; k < 256; k++) {
        int fd = wl_accept(lfd);
        if (fd < 0)
            break; /* EAGAIN: drained (ECONNABORTED etc.: try again later) */
        wl_close(fd);
        n++;
    }
    atomic_fetch_add_explicit(&n_accepted, n, memory_order_relaxed);
    return n;
}

static void *accept_thread(void *arg)
{
    (void)arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        wl_die(WL_EXIT_RUNTIME, "epoll_create1: %s", strerror(errno));
    for (int p = 0; p < cfg.nports; p++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = listen_fds[p]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, listen_fds[p], &ev) != 0)
            wl_die(WL_EXIT_RUNTIME, "epoll_ctl: %s", strerror(errno));
    }
    struct epoll_event evs[MAX_PORTS];
    while (!atomic_load(&stop_accept)) {
        int n = epoll_wait(ep, evs, MAX_PORTS, 50);
        for (int k = 0; k < n; k++)
            churn_accept(evs[k].data.fd);
    }
    close(ep);
    return NULL;
}

static double parse_rate(const char *s)
{
    char buf[64];
    size_t n = strlen(s);
    if (n >= sizeof buf)
        wl_die(WL_EXIT_USAGE, "--rate: bad value '%s'", s);
    memcpy(buf, s, n + 1);
    if (n > 2 && strcmp(buf + n - 2, "/s") == 0)
        buf[n - 2] = '\0';
    char *end = NULL;
    errno = 0;
    double r = strtod(buf, &end);
    if (errno != 0 || end == buf || *end != '\0' || !(r >= 0.0) || r > 1e7)
        wl_die(WL_EXIT_USAGE, "--rate: bad value '%s' (connections per second, 0 = unthrottled)",
               s);
    return r;
}

static void usage(void)
{
    wl_die(WL_EXIT_USAGE, "usage: churn [--connections N] [--rate R/s] [--ports K] [--rst] "
                          "[--seconds S] [--threads T] [--ipv6] [--cpu C] [--start-delay-ms D]");
}

int main(int argc, char **argv)
{
    double seconds = 60.0, start_delay = 0.0;
    int seconds_given = 0, connections_given = 0;
    long cpu = -1;
    wl_signals_init("churn");
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = wl_optval(argc, argv, &i, "--connections"))) {
            cfg.connections = wl_parse_long("--connections", v, 0, MAX_CONNECTIONS);
            connections_given = 1;
        } else if ((v = wl_optval(argc, argv, &i, "--rate"))) {
            cfg.rate = parse_rate(v);
        } else if ((v = wl_optval(argc, argv, &i, "--ports"))) {
            cfg.nports = (int)wl_parse_long("--ports", v, 1, MAX_PORTS);
        } else if ((v = wl_optval(argc, argv, &i, "--threads"))) {
            cfg.threads = (int)wl_parse_long("--threads", v, 1, MAX_THREADS);
        } else if ((v = wl_optval(argc, argv, &i, "--seconds"))) {
            seconds = wl_parse_duration("--seconds", v, WL_MAX_HOLD_S);
            seconds_given = 1;
        } else if ((v = wl_optval(argc, argv, &i, "--cpu"))) {
            cpu = wl_parse_long("--cpu", v, 0, CPU_SETSIZE - 1);
        } else if ((v = wl_optval(argc, argv, &i, "--start-delay-ms"))) {
            start_delay = (double)wl_parse_long("--start-delay-ms", v, 0, 60000) / 1000.0;
        } else if (strcmp(argv[i], "--rst") == 0) {
            cfg.rst = 1;
        } else if (strcmp(argv[i], "--ipv6") == 0) {
            cfg.ipv6 = 1;
        } else {
            usage();
        }
    }
    if (seconds_given && !connections_given)
        cfg.connections = MAX_CONNECTIONS; /* bounded by time only */
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0)
            wl_die(WL_EXIT_RUNTIME, "cannot pin to CPU %ld: %s", cpu, strerror(errno));
    }
    wl_raise_nofile();

    for (int p = 0; p < cfg.nports; p++)
        listen_fds[p] = wl_listen(cfg.ipv6, 0, 4096, 1, &ports[p]);

    struct wl_buf b = {0};
    wl_bprintf(&b, "{\"pid\":%d,\"ports\":", (int)getpid());
    wl_bints(&b, ports, cfg.nports);
    wl_bprintf(&b,
               ",\"family\":\"%s\",\"connections\":%ld,\"rate\":%g,\"threads\":%d,\"rst\":%s,"
               "\"seconds\":%g}",
               cfg.ipv6 ? "ipv6" : "ipv4", cfg.connections, cfg.rate, cfg.threads,
               cfg.rst ? "true" : "false", seconds);
    wl_emit("READY", b.s);

    if (start_delay > 0) {
        double until = wl_now() + start_delay;
        double left;
        while ((left = until - wl_now()) > 0)
            if (wl_is_stop(wl_wait(left, -1, NULL)))
                return 0;
    }

    t_start = wl_now();
    t_deadline = t_start + seconds;
    pthread_t acc, clients[MAX_THREADS];
    if (pthread_create(&acc, NULL, accept_thread, NULL) != 0)
        wl_die(WL_EXIT_RUNTIME, "pthread_create failed");
    for (int t = 0; t < cfg.threads; t++)
        if (pthread_create(&clients[t], NULL, client_thread, &finish_time[t]) != 0)
            wl_die(WL_EXIT_RUNTIME, "pthread_create failed");

    /* Wait for the clients, watching for SIGTERM/SIGINT. */
    while (atomic_load(&clients_done) < cfg.threads) {
        if (wl_is_stop(wl_wait(0.02, -1, NULL)))
            atomic_store(&stop_clients, 1);
    }
    for (int t = 0; t < cfg.threads; t++)
        pthread_join(clients[t], NULL);
    double t_end = t_start;
    for (int t = 0; t < cfg.threads; t++)
        t_end = finish_time[t] > t_end ? finish_time[t] : t_end;
    double elapsed = t_end - t_start;

    /* Let the accept thread catch up (bounded: 2 s). */
    double grace = wl_now() + 2.0;
    while (atomic_load(&n_accepted) < atomic_load(&n_connected) && wl_now() < grace)
        if (wl_is_stop(wl_wait(0.005, -1, NULL)))
            break;
    atomic_store(&stop_accept, 1);
    pthread_join(acc, NULL);

    long n = atomic_load(&n_connected);
    b.len = 0;
    wl_bprintf(&b,
               "{\"connections\":%ld,\"accepted\":%ld,\"failed\":%ld,\"seconds\":%.3f,"
               "\"rate\":%.1f,\"last_error\":\"%s\",\"pid\":%d}",
               n, atomic_load(&n_accepted), atomic_load(&n_failed), elapsed,
               elapsed > 0 ? (double)n / elapsed : 0.0,
               atomic_load(&n_failed) ? strerror(atomic_load(&last_error)) : "", (int)getpid());
    wl_emit("DONE", b.s);
    free(b.s);
    for (int p = 0; p < cfg.nports; p++)
        close(listen_fds[p]);
    return 0;
}
