/* loadgen.c - SSE load generator for bench/bench.py (compiled there with gcc).
 *
 * One thread, one epoll loop: holds N subscriber connections on an SSE
 * endpoint and publishes over K keep-alive connections, either closed-loop
 * (each connection publishes again as soon as it is answered) or at a fixed
 * total rate. Every published body is "<CLOCK_MONOTONIC ns> <n>", so every
 * delivered "data:" line yields a latency. Prints one JSON object.
 *
 *   loadgen HOST PORT EVENTS_PATH PUBLISH_PATH SUBS PUBCONNS MODE RATE DURATION_S [SUB_PORT2]
 *   MODE: closed | rate   (RATE: publishes per second in total, for rate)
 *   SUB_PORT2: every other subscriber connects to this port instead (two instances)
 *   EVENTS_PATH may hold "@N@", replaced by each subscriber's number (so that
 *   each can hold a selector of its own).
 *   With LOADGEN_FORM_TOPIC=T in the environment, each publish is a form,
 *   "topic=T&data=<ns>+<n>" (the Mercure route), instead of a raw body.
 *
 * Prints "connected" once every subscriber is in, waits a second (bench.py
 * reads the server's idle memory then), and publishes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { SUB, PUB };
enum { CONNECTING, WAITING_HEAD, STREAMING, PUB_IDLE, PUB_WAITING, CLOSED };

typedef struct {
    int fd, kind, state;
    char line[512];             /* a partial line carried to the next read */
    int line_len;
    long events;
    char head[8192];            /* publisher: the response being read */
    int head_len, body_left;
} conn_t;

static struct sockaddr_in server_address, second_address;
static int use_second;
static const char *events_path, *publish_path;
static int epfd;
static long connected_subs, published, publish_errors, deliveries, skipped, subs_closed;
static double *latencies_ms, last_delivery_s;
static long latencies_len, latencies_cap;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void record_latency(double ms) {
    if (latencies_len == latencies_cap) {
        latencies_cap = latencies_cap ? latencies_cap * 2 : 1 << 20;
        latencies_ms = realloc(latencies_ms, latencies_cap * sizeof(double));
        if (!latencies_ms) { perror("realloc"); exit(2); }
    }
    latencies_ms[latencies_len++] = ms;
}

static double now_s(void);

static int open_connection(conn_t *c, int kind, int second) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { perror("socket"); exit(2); }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->kind = kind;
    c->state = CONNECTING;
    c->line_len = 0;
    struct sockaddr_in *address = second ? &second_address : &server_address;
    int rc = connect(c->fd, (struct sockaddr *)address, sizeof *address);
    if (rc < 0 && errno != EINPROGRESS) { perror("connect"); return -1; }
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.ptr = c };
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static void send_all(conn_t *c, const char *data, int len) {
    while (len > 0) {   /* requests are small: a short blocking retry is fine */
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) { struct timespec pause = {0, 100000}; nanosleep(&pause, 0); continue; }
            c->state = CLOSED;
            return;
        }
        data += n;
        len -= n;
    }
}

static const char *form_topic;   /* LOADGEN_FORM_TOPIC, or NULL */

static void publish(conn_t *c, long n) {
    char body[640], request[1024];
    int body_len = form_topic
        ? snprintf(body, sizeof body, "topic=%s&data=%lld+%ld", form_topic, now_ns(), n)
        : snprintf(body, sizeof body, "%lld %ld", now_ns(), n);
    int len = snprintf(request, sizeof request,
                       "POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: %s\r\n"
                       "Content-Length: %d\r\n\r\n%s", publish_path,
                       form_topic ? "application/x-www-form-urlencoded" : "text/plain",
                       body_len, body);
    c->state = PUB_WAITING;
    c->head_len = 0;
    c->body_left = -1;
    send_all(c, request, len);
}

/* One line of a subscriber's stream (chunk-size lines and comments pass through). */
static void subscriber_line(conn_t *c, char *line, int len) {
    if (len && line[len - 1] == '\r') line[--len] = 0;
    if (c->state == WAITING_HEAD) {
        if (len == 0) c->state = STREAMING;
        else if (!strncmp(line, "HTTP/1.", 7)) {
            if (strncmp(line + 9, "200", 3)) { fprintf(stderr, "subscribe: %s\n", line); exit(3); }
            connected_subs++;
        }
        return;
    }
    if (len > 6 && !memcmp(line, "data: ", 6) && line[6] >= '0' && line[6] <= '9') {
        long long sent = strtoll(line + 6, 0, 10);
        long long received = now_ns();
        record_latency((received - sent) / 1e6);
        last_delivery_s = received / 1e9;
        c->events++;
        deliveries++;
    }
}

static void subscriber_read(conn_t *c) {
    char buffer[65536];
    for (;;) {
        ssize_t n = recv(c->fd, buffer, sizeof buffer, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) { c->state = CLOSED; subs_closed++; close(c->fd); return; }
        if (n < 0) return;
        int start = 0;
        for (int i = 0; i < n; i++) {
            if (buffer[i] != '\n') continue;
            int part = i - start;
            if (c->line_len) {      /* finish the line carried from the last read */
                int room = (int)sizeof c->line - 1 - c->line_len;
                if (part > room) part = room;
                memcpy(c->line + c->line_len, buffer + start, part);
                c->line_len += part;
                c->line[c->line_len] = 0;
                subscriber_line(c, c->line, c->line_len);
                c->line_len = 0;
            } else {
                buffer[i] = 0;
                subscriber_line(c, buffer + start, part);
            }
            start = i + 1;
        }
        int rest = n - start;
        if (rest > (int)sizeof c->line - 1 - c->line_len) rest = sizeof c->line - 1 - c->line_len;
        memcpy(c->line + c->line_len, buffer + start, rest);
        c->line_len += rest;
    }
}

/* Returns 1 when a whole response (with Content-Length) has arrived. */
static int publisher_read(conn_t *c) {
    char buffer[16384];
    int done = 0;
    for (;;) {
        ssize_t n = recv(c->fd, buffer, sizeof buffer, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) { c->state = CLOSED; close(c->fd); return done; }
        if (n < 0) return done;
        for (ssize_t i = 0; i < n; i++) {
            if (c->body_left < 0) {
                if (c->head_len < (int)sizeof c->head - 1) c->head[c->head_len++] = buffer[i];
                c->head[c->head_len] = 0;
                if (c->head_len >= 4 && !memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4)) {
                    char *length = strcasestr(c->head, "\r\ncontent-length:");
                    c->body_left = length ? atoi(length + 17) : 0;
                    if (strncmp(c->head + 9, "20", 2)) publish_errors++; else published++;
                }
            } else {
                c->body_left--;
            }
            if (c->body_left == 0) {
                c->state = PUB_IDLE;
                c->head_len = 0;
                c->body_left = -1;
                done = 1;
            }
        }
    }
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double p) {
    if (!latencies_len) return 0;
    long i = (long)(p * (latencies_len - 1));
    return latencies_ms[i];
}

int main(int argc, char **argv) {
    if (argc != 10 && argc != 11) {
        fprintf(stderr, "usage: loadgen HOST PORT EVENTS_PATH PUBLISH_PATH SUBS PUBCONNS MODE RATE DURATION_S [SUB_PORT2]\n");
        return 2;
    }
    second_address.sin_family = AF_INET;
    inet_pton(AF_INET, argv[1], &second_address.sin_addr);
    if (argc == 11) { use_second = 1; second_address.sin_port = htons(atoi(argv[10])); }
    server_address.sin_family = AF_INET;
    server_address.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &server_address.sin_addr);
    events_path = argv[3];
    publish_path = argv[4];
    int subs = atoi(argv[5]), pubconns = atoi(argv[6]);
    int closed_loop = !strcmp(argv[7], "closed");
    double rate = atof(argv[8]), duration = atof(argv[9]);

    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);

    epfd = epoll_create1(0);
    conn_t *conns = calloc(subs + pubconns, sizeof(conn_t));
    form_topic = getenv("LOADGEN_FORM_TOPIC");
    char request[1024];
    const char *numbered = strstr(events_path, "@N@");
    int request_len = 0;
    struct epoll_event events[1024];

    /* Phase 1: connect every subscriber, at most 1000 handshakes in flight. */
    double started = now_s();
    int opened = 0;
    long pending = 0;
    while (connected_subs < subs) {
        while (opened < subs && pending < 1000) {
            open_connection(&conns[opened], SUB, use_second && opened % 2);
            opened++;
            pending++;
        }
        int n = epoll_wait(epfd, events, 1024, 100);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->state == CONNECTING && (events[i].events & EPOLLOUT)) {
                struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                c->state = WAITING_HEAD;
                int number = (int)(c - conns);
                request_len = numbered
                    ? snprintf(request, sizeof request, "GET %.*s%d%s HTTP/1.1\r\nHost: bench\r\n"
                               "Accept: text/event-stream\r\n\r\n", (int)(numbered - events_path),
                               events_path, number, numbered + 3)
                    : snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: bench\r\n"
                               "Accept: text/event-stream\r\n\r\n", events_path);
                send_all(c, request, request_len);
            }
            if ((events[i].events & EPOLLIN) && c->state != CLOSED) {
                long before = connected_subs;
                subscriber_read(c);
                pending -= connected_subs - before;
            }
        }
        if (subs_closed) { fprintf(stderr, "%ld subscribers were refused or closed\n", subs_closed); return 3; }
        if (now_s() - started > 120) { fprintf(stderr, "connecting timed out at %ld\n", connected_subs); return 3; }
    }
    double connect_s = now_s() - started;
    printf("connected\n");
    fflush(stdout);
    for (double quiet_until = now_s() + 1; now_s() < quiet_until;) {   /* idle: memory is read */
        int n = epoll_wait(epfd, events, 1024, 100);
        for (int i = 0; i < n; i++) subscriber_read(events[i].data.ptr);
    }

    /* Phase 2: publish for DURATION seconds. */
    conn_t *publishers = conns + subs;
    for (int i = 0; i < pubconns; i++) open_connection(&publishers[i], PUB, 0);
    struct rusage usage_before, usage_after;
    getrusage(RUSAGE_SELF, &usage_before);
    double start = now_s(), end = start + duration, next_publish = start;
    long sequence = 0;
    deliveries = 0;
    latencies_len = 0;
    while (now_s() < end) {
        int timeout_ms = closed_loop ? 100 : 1;
        int n = epoll_wait(epfd, events, 1024, timeout_ms);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->kind == PUB && c->state == CONNECTING && (events[i].events & EPOLLOUT)) {
                struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                c->state = PUB_IDLE;
                if (closed_loop) publish(c, sequence++);
                continue;
            }
            if (!(events[i].events & EPOLLIN) || c->state == CLOSED) continue;
            if (c->kind == SUB) subscriber_read(c);
            else if (publisher_read(c) && closed_loop && now_s() < end) publish(c, sequence++);
        }
        if (!closed_loop) {
            double t = now_s();
            while (next_publish <= t && t < end) {
                conn_t *idle = 0;
                for (int i = 0; i < pubconns; i++) if (publishers[i].state == PUB_IDLE) { idle = &publishers[i]; break; }
                if (idle) publish(idle, sequence++); else skipped++;
                next_publish += 1.0 / rate;
            }
        }
    }
    double publish_s = now_s() - start;

    /* Phase 3: drain until every accepted event arrived everywhere (or 10 s pass). */
    double drain_until = now_s() + 10;
    int publishers_busy = 1;
    while (now_s() < drain_until && (deliveries < published * subs || publishers_busy)) {
        int n = epoll_wait(epfd, events, 1024, 50);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (!(events[i].events & EPOLLIN) || c->state == CLOSED) continue;
            if (c->kind == SUB) subscriber_read(c); else publisher_read(c);
        }
        publishers_busy = 0;
        for (int i = 0; i < pubconns; i++) if (publishers[i].state == PUB_WAITING) publishers_busy = 1;
    }
    getrusage(RUSAGE_SELF, &usage_after);
    double cpu_s = (usage_after.ru_utime.tv_sec - usage_before.ru_utime.tv_sec) +
                   (usage_after.ru_utime.tv_usec - usage_before.ru_utime.tv_usec) / 1e6 +
                   (usage_after.ru_stime.tv_sec - usage_before.ru_stime.tv_sec) +
                   (usage_after.ru_stime.tv_usec - usage_before.ru_stime.tv_usec) / 1e6;

    qsort(latencies_ms, latencies_len, sizeof(double), compare);
    printf("{\"subscribers\": %d, \"connect_s\": %.3f, \"duration_s\": %.3f, \"published\": %ld, "
           "\"publish_errors\": %ld, \"skipped\": %ld, \"deliveries\": %ld, \"lost\": %ld, "
           "\"subscribers_closed\": %ld, \"publishes_per_s\": %.1f, \"deliveries_per_s\": %.1f, "
           "\"p50_ms\": %.2f, \"p99_ms\": %.2f, \"max_ms\": %.2f, \"loadgen_cpu_s\": %.2f}\n",
           subs, connect_s, publish_s, published, publish_errors, skipped, deliveries,
           published * subs - deliveries, subs_closed, published / publish_s,
           deliveries / (last_delivery_s > start ? last_delivery_s - start : publish_s),
           percentile(0.5), percentile(0.99),
           latencies_len ? latencies_ms[latencies_len - 1] : 0, cpu_s);
    return 0;
}
