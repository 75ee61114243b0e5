/*
 * holder: one process that opens and holds many loopback TCP sockets at once,
 * for the "100,000 sockets held open" benchmark of benchmarks/churn.
 *
 *   holder --sockets N [--ports K] [--hold S]
 *
 * Listens on K loopback ports (default 8), then makes N/2 connections to them
 * round robin and accepts each one itself, so it holds N established sockets
 * (N/2 client ends from hold_connect, N/2 server ends from hold_accept) plus K
 * listeners. RLIMIT_NOFILE is raised to fit (needs root beyond the hard limit).
 * Prints `READY {"pid":..,"sockets":..,"listeners":..,"seconds":..}` once
 * everything is held, then holds until S seconds (default 60, max 600) pass
 * or SIGTERM/SIGINT, and exits 0 without closing anything itself (SO_LINGER 0:
 * the exit resets every connection, leaving no TIME_WAIT).
 *
 * Built by benchmarks/churn with -O1 -g -fno-omit-frame-pointer, so the stacks
 * tcptrace captures are hold_connect <- hold_all <- main and
 * hold_accept <- hold_all <- main.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 64
#define MAX_SOCKETS 2000000L
#define NOINLINE __attribute__((noinline, used))

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void die(const char *what)
{
    fprintf(stderr, "holder: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* Close with an RST when the holder exits, so 100,000 sockets leave no TIME_WAIT
 * behind to slow down whatever lists the host's sockets next (ss, sock_diag). */
static void linger0(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

NOINLINE int hold_connect(int port)
{
    struct sockaddr_in a = loopback(port);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd; /* held */
}

NOINLINE int hold_accept(int lfd)
{
    return accept4(lfd, NULL, NULL, SOCK_CLOEXEC); /* held */
}

/* Returns the number of sockets held (client + server ends). */
NOINLINE long hold_all(const int *lfds, const int *ports, int nports, long pairs)
{
    long held = 0;
    for (long i = 0; i < pairs && !stop_flag; i++) {
        int p = (int)(i % nports);
        int c = hold_connect(ports[p]);
        if (c < 0)
            die("connect");
        int a = hold_accept(lfds[p]);
        if (a < 0)
            die("accept");
        linger0(c);
        linger0(a);
        held += 2;
    }
    __asm__ volatile("" ::: "memory");
    return held;
}

int main(int argc, char **argv)
{
    long sockets = 100000;
    int nports = 8;
    double hold = 60.0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--sockets") == 0 && i + 1 < argc)
            sockets = strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--ports") == 0 && i + 1 < argc)
            nports = (int)strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--hold") == 0 && i + 1 < argc)
            hold = strtod(argv[++i], NULL);
        else {
            fprintf(stderr, "usage: holder --sockets N [--ports K] [--hold S]\n");
            return 2;
        }
    }
    if (sockets < 2 || sockets > MAX_SOCKETS || nports < 1 || nports > MAX_PORTS || !(hold > 0) ||
        hold > 600) {
        fprintf(stderr, "holder: bad arguments (sockets 2..%ld, ports 1..%d, hold 0..600)\n",
                MAX_SOCKETS, MAX_PORTS);
        return 2;
    }
    struct rlimit rl;
    rlim_t want = (rlim_t)sockets + (rlim_t)nports + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < want) {
        rl.rlim_cur = want;
        if (rl.rlim_max < want)
            rl.rlim_max = want;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            die("setrlimit(RLIMIT_NOFILE)");
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int lfds[MAX_PORTS], ports[MAX_PORTS];
    for (int p = 0; p < nports; p++) {
        struct sockaddr_in a = loopback(0);
        lfds[p] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (lfds[p] < 0)
            die("socket");
        if (bind(lfds[p], (struct sockaddr *)&a, sizeof a) != 0)
            die("bind");
        if (listen(lfds[p], 4096) != 0)
            die("listen");
        socklen_t len = sizeof a;
        if (getsockname(lfds[p], (struct sockaddr *)&a, &len) != 0)
            die("getsockname");
        ports[p] = ntohs(a.sin_port);
    }
    double t0 = now_s();
    long held = hold_all(lfds, ports, nports, sockets / 2);
    double took = now_s() - t0;
    printf("READY {\"pid\":%d,\"sockets\":%ld,\"listeners\":%d,\"seconds\":%.3f}\n", (int)getpid(),
           held, nports, took);
    fflush(stdout);
    double deadline = now_s() + hold;
    while (!stop_flag && now_s() < deadline) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return 0;
}
