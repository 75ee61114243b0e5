/*
 * busy: burns CPU (no sockets, almost no syscalls) for S seconds, optionally
 * pinned to one CPU, so that softirqs firing on that CPU interrupt this
 * process. tcptrace must not attribute the network work they do to it.
 *
 *   busy [--seconds S] [--cpu C] [--threads T]
 *
 * Default 5s (max 600s), no pinning, 1 thread. With --cpu every thread is
 * pinned to CPU C. Prints `READY {json}` before it starts burning and
 * `DONE {json}` at the end; exits 0 at the end or on SIGTERM/SIGINT.
 *
 * Stack names: burn_cpu <- burn_thread (threads) / main.
 */
#include "wlcommon.c"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#define MAX_THREADS 64

static atomic_int stop_flag;
static double end_time;

/* Spin until `deadline` (monotonic seconds) or stop; returns the iterations. */
WL_NOINLINE unsigned long long burn_cpu(double deadline)
{
    volatile unsigned long long x = 0x9e3779b97f4a7c15ULL;
    unsigned long long iters = 0;
    while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
        for (int k = 0; k < 100000; k++) /* ~0.1 ms of arithmetic */
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        iters++;
        if (wl_now() >= deadline) /* vDSO clock: no syscall */
            break;
    }
    return iters;
}

static void *burn_thread(void *arg)
{
    unsigned long long *out = arg;
    *out = burn_cpu(end_time);
    return NULL;
}

static void usage(void)
{
    wl_die(WL_EXIT_USAGE, "usage: busy [--seconds S] [--cpu C] [--threads T]");
}

int main(int argc, char **argv)
{
    double seconds = 5.0;
    long cpu = -1, threads = 1;
    wl_signals_init("busy");
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = wl_optval(argc, argv, &i, "--seconds")))
            seconds = wl_parse_duration("--seconds", v, WL_MAX_HOLD_S);
        else if ((v = wl_optval(argc, argv, &i, "--cpu")))
            cpu = wl_parse_long("--cpu", v, 0, CPU_SETSIZE - 1);
        else if ((v = wl_optval(argc, argv, &i, "--threads")))
            threads = wl_parse_long("--threads", v, 1, MAX_THREADS);
        else
            usage();
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) /* threads inherit it */
            wl_die(WL_EXIT_RUNTIME, "cannot pin to CPU %ld: %s", cpu, strerror(errno));
    }

    struct wl_buf b = {0};
    wl_bprintf(&b, "{\"pid\":%d,\"cpu\":%ld,\"seconds\":%g,\"threads\":%ld}", (int)getpid(), cpu,
               seconds, threads);
    wl_emit("READY", b.s);

    double start = wl_now();
    end_time = start + seconds;
    pthread_t tids[MAX_THREADS];
    unsigned long long iters[MAX_THREADS] = {0};
    for (long t = 1; t < threads; t++)
        if (pthread_create(&tids[t], NULL, burn_thread, &iters[t]) != 0)
            wl_die(WL_EXIT_RUNTIME, "pthread_create failed");
    /* The main thread burns too, checking for signals between slices. */
    double now;
    while ((now = wl_now()) < end_time) {
        double slice_end = now + 0.01;
        iters[0] += burn_cpu(slice_end < end_time ? slice_end : end_time);
        if (wl_is_stop(wl_poll_signal()))
            break;
    }
    atomic_store(&stop_flag, 1);
    unsigned long long total = 0;
    for (long t = 0; t < threads; t++) {
        if (t > 0)
            pthread_join(tids[t], NULL);
        total += iters[t];
    }
    b.len = 0;
    wl_bprintf(&b, "{\"pid\":%d,\"seconds\":%.3f,\"iterations\":%llu}", (int)getpid(),
               wl_now() - start, total);
    wl_emit("DONE", b.s);
    free(b.s);
    return 0;
}
