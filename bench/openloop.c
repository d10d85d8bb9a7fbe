/* Open-loop HTTP/1.1 load: requests go out on a fixed schedule whatever the server does, and each
 * latency counts from the request's scheduled time, so a slow server cannot slow the load down
 * (no coordinated omission). Compiled (bench/openloop.py builds it with plain -O2), one thread, epoll:
 * it uses a few percent of a core where a Python generator took a third of one on the same two cores.
 *
 *   openloop HOST PORT PATH BODIES RATE SECONDS CONNECTIONS
 *
 * BODIES: a file with one JSON body per line, used in turn. Prints one line per scheduled request:
 * "due_us latency_us status" (status 0: no answer - connection error, or none within SECONDS + 30 s).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    long request; /* index of the request in flight, -1 when idle */
    char buf[1 << 16];
    size_t len;
} conn_t;

static struct sockaddr_in addr;
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Bytes of a complete response at the start of buf (0: not complete yet); its status in *status. */
static size_t complete_response(const char *buf, size_t len, int *status) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t header = (size_t)(end - buf) + 4;
    *status = len > 12 ? atoi(buf + 9) : 0;
    for (const char *p = buf; p < end; p++) {
        if ((p == buf || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
            size_t body = strtoul(p + 15, NULL, 10);
            return len >= header + body ? header + body : 0;
        }
    }
    const char *last = memmem(end, len - (size_t)(end - buf), "\r\n0\r\n\r\n", 7); /* chunked */
    return last ? (size_t)(last - buf) + 7 : 0;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: openloop HOST PORT PATH BODIES RATE SECONDS CONNECTIONS\n");
        return 2;
    }
    const char *host = argv[1], *path = argv[3];
    double rate = atof(argv[5]), seconds = atof(argv[6]);
    int nconn = atoi(argv[7]);
    long total = (long)(rate * seconds);
    if (rate <= 0 || total <= 0 || nconn <= 0) {
        fprintf(stderr, "openloop: RATE, SECONDS and CONNECTIONS must be positive\n");
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "openloop: HOST must be an IPv4 address, not %s\n", host);
        return 2;
    }

    FILE *file = fopen(argv[4], "r");
    if (!file) {
        perror(argv[4]);
        return 2;
    }
    char **requests = NULL, *line = NULL;
    size_t *lengths = NULL, cap = 0;
    long nbodies = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, file)) > 0) {
        while (got && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        if (!got) continue;
        requests = realloc(requests, (nbodies + 1) * sizeof *requests);
        lengths = realloc(lengths, (nbodies + 1) * sizeof *lengths);
        int n = asprintf(&requests[nbodies], "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zd\r\n\r\n%s", path, host, argv[2], got, line);
        lengths[nbodies++] = (size_t)n;
    }
    fclose(file);
    if (!nbodies) {
        fprintf(stderr, "openloop: %s has no bodies\n", argv[4]);
        return 2;
    }

    double *due = malloc(total * sizeof *due), *latency = calloc(total, sizeof *latency);
    int *status = calloc(total, sizeof *status);
    long *pending = malloc(total * sizeof *pending), head = 0, tail = 0;
    conn_t *conns = calloc(nconn, sizeof *conns);
    int *idle = malloc(nconn * sizeof *idle), nidle = 0;
    int ep = epoll_create1(0), timer = timerfd_create(CLOCK_MONOTONIC, 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)-1};
    epoll_ctl(ep, EPOLL_CTL_ADD, timer, &ev);
    for (int i = 0; i < nconn; i++) {
        conns[i].fd = open_conn();
        conns[i].request = -1;
        if (conns[i].fd < 0) {
            fprintf(stderr, "openloop: cannot connect to %s:%s\n", host, argv[2]);
            return 1;
        }
        ev.data.u64 = (uint64_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        idle[nidle++] = i;
    }

    double start = now() + 0.05, give_up = start + seconds + 30;
    long next = 0, done = 0;
    struct epoll_event events[256];
    while (done < total && now() < give_up) {
        double t = now();
        while (next < total && start + next / rate <= t) {
            due[next] = start + next / rate;
            pending[tail++] = next++;
        }
        while (head < tail && nidle) {
            int c = idle[--nidle];
            long r = pending[head++];
            conns[c].request = r;
            conns[c].len = 0;
            if (write(conns[c].fd, requests[r % nbodies], lengths[r % nbodies]) != (ssize_t)lengths[r % nbodies]) {
                latency[r] = now() - due[r]; /* status stays 0 */
                done++;
                conns[c].request = -1;
                epoll_ctl(ep, EPOLL_CTL_DEL, conns[c].fd, NULL);
                close(conns[c].fd);
                conns[c].fd = open_conn();
                if (conns[c].fd >= 0) {
                    ev.data.u64 = (uint64_t)c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, conns[c].fd, &ev);
                    idle[nidle++] = c;
                }
            }
        }
        if (next < total) {
            double at = start + next / rate;
            struct itimerspec spec = {.it_value = {(time_t)at, (long)((at - (time_t)at) * 1e9)}};
            timerfd_settime(timer, TFD_TIMER_ABSTIME, &spec, NULL);
        }
        int n = epoll_wait(ep, events, 256, 1000);
        for (int k = 0; k < n; k++) {
            if (events[k].data.u64 == (uint64_t)-1) {
                uint64_t ticks;
                if (read(timer, &ticks, sizeof ticks) < 0 && errno != EAGAIN) return 1;
                continue;
            }
            conn_t *conn = &conns[events[k].data.u64];
            ssize_t r = read(conn->fd, conn->buf + conn->len, sizeof conn->buf - conn->len);
            if (r <= 0) { /* the server closed it, or an error: the request in flight is lost */
                int was_busy = conn->request >= 0; /* an idle one is on the idle stack already */
                if (was_busy) {
                    latency[conn->request] = now() - due[conn->request];
                    done++;
                }
                epoll_ctl(ep, EPOLL_CTL_DEL, conn->fd, NULL);
                close(conn->fd);
                conn->fd = open_conn();
                conn->request = -1;
                if (conn->fd >= 0) {
                    ev.data.u64 = events[k].data.u64;
                    epoll_ctl(ep, EPOLL_CTL_ADD, conn->fd, &ev);
                    if (was_busy) idle[nidle++] = (int)events[k].data.u64;
                }
                continue;
            }
            conn->len += (size_t)r;
            int code = 0;
            if (conn->request >= 0 && complete_response(conn->buf, conn->len, &code)) {
                latency[conn->request] = now() - due[conn->request];
                status[conn->request] = code;
                done++;
                conn->request = -1;
                conn->len = 0;
                idle[nidle++] = (int)events[k].data.u64;
            }
        }
    }
    for (long r = 0; r < total; r++) {
        double lat = r < next && (status[r] || latency[r] > 0) ? latency[r] : seconds + 30;
        printf("%.0f %.0f %d\n", ((r < next ? due[r] : start + r / rate) - start) * 1e6, lat * 1e6, status[r]);
    }
    return 0;
}
