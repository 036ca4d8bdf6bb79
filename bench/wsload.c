/* wsload: WebSocket echo load generator (RFC 6455 client over cleartext HTTP/1.1).
 *
 * N connections on one epoll loop. Each does the Upgrade handshake (no extensions,
 * so no server compresses), then loops: send one small masked text message, wait
 * for the whole echo, record the round-trip time, send the next. Stops after -d
 * seconds and prints round trips per second and latency percentiles.
 *
 *   wsload -c 64 -d 10 [-s 32] [--connect-timeout 10] [--json] ws://127.0.0.1:8000/ws
 *
 * Exit status 0 when at least one round trip completed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { S_CONNECTING, S_HANDSHAKE, S_OPEN, S_DEAD };

typedef struct {
    int fd;
    int state;
    uint8_t rbuf[65536 + 64];
    size_t rlen;
    uint8_t wbuf[512];
    size_t wlen, woff;
    double sent_at;
    int used; /* completed at least one round trip */
} conn;

static struct {
    int conns;
    double duration, connect_timeout;
    size_t size;
    int json;
    char host[256], port[16], path[1024];
} opt = {.conns = 64, .duration = 10, .connect_timeout = 10, .size = 32};

static uint32_t *lat;        /* round-trip times, microseconds */
static size_t nlat, cap_lat; /* owned by main; freed at exit */
static long errors;
static char first_error[256];
static uint64_t rng = 0x9E3779B97F4A7C15ULL;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint32_t rand32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

static void fail(conn *c, const char *why)
{
    if (!first_error[0]) {
        snprintf(first_error, sizeof first_error, "%s", why);
        for (char *q = first_error; *q; q++) /* it goes into a JSON string */
            if (*q == '"' || *q == '\\' || (unsigned char)*q < 0x20)
                *q = '\'';
    }
    errors++;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = S_DEAD;
}

static void record(double dt)
{
    if (nlat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 1 << 16;
        uint32_t *n = realloc(lat, cap_lat * sizeof *lat);
        if (!n) {
            perror("realloc");
            exit(2);
        }
        lat = n;
    }
    lat[nlat++] = (uint32_t)(dt * 1e6);
}

static int flush_out(conn *c)
{
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN)
                return 0;
            fail(c, strerror(errno));
            return -1;
        }
        c->woff += (size_t)n;
    }
    c->wlen = c->woff = 0;
    return 0;
}

/* One masked client frame into wbuf. */
static void queue_frame(conn *c, int opcode, const uint8_t *payload, size_t n)
{
    uint8_t *p = c->wbuf + c->wlen;
    size_t h = 2;
    p[0] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        p[1] = (uint8_t)(0x80 | n);
    } else {
        p[1] = 0x80 | 126;
        p[2] = (uint8_t)(n >> 8);
        p[3] = (uint8_t)n;
        h = 4;
    }
    uint32_t key = rand32();
    memcpy(p + h, &key, 4);
    const uint8_t *k = p + h;
    for (size_t i = 0; i < n; i++)
        p[h + 4 + i] = payload[i] ^ k[i & 3];
    c->wlen += h + 4 + n;
}

static void send_message(conn *c)
{
    static uint8_t msg[400];
    if (!msg[0])
        for (size_t i = 0; i < sizeof msg; i++)
            msg[i] = (uint8_t)('a' + i % 26);
    queue_frame(c, 1, msg, opt.size);
    c->sent_at = now();
    flush_out(c);
}

/* Consume whole frames; returns -1 when the connection failed. */
static int on_frames(conn *c)
{
    size_t off = 0;
    while (c->rlen - off >= 2) {
        uint8_t *p = c->rbuf + off;
        uint64_t n = p[1] & 0x7F;
        size_t h = 2;
        if (n == 126) {
            if (c->rlen - off < 4)
                break;
            n = (uint64_t)p[2] << 8 | p[3];
            h = 4;
        } else if (n == 127) {
            fail(c, "unexpectedly large frame from the server");
            return -1;
        }
        if (c->rlen - off < h + n)
            break;
        int op = p[0] & 0x0F;
        if (op == 8) {
            fail(c, "server closed the websocket");
            return -1;
        } else if (op == 9) {
            queue_frame(c, 10, p + h, (size_t)n);
            flush_out(c);
        } else if (op == 1 || op == 2) {
            if (n != opt.size) {
                fail(c, "echo of the wrong length");
                return -1;
            }
            record(now() - c->sent_at);
            c->used = 1;
            send_message(c);
        }
        off += h + (size_t)n;
    }
    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
    c->rlen -= off;
    return 0;
}

static void on_readable(conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, sizeof c->rbuf - c->rlen, 0);
        if (n < 0) {
            if (errno != EAGAIN)
                fail(c, strerror(errno));
            return;
        }
        if (n == 0) {
            fail(c, "server closed the connection");
            return;
        }
        c->rlen += (size_t)n;
        if (c->state == S_HANDSHAKE) {
            uint8_t *end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
            if (!end) {
                if (c->rlen == sizeof c->rbuf)
                    fail(c, "handshake response too long");
                continue;
            }
            if (c->rlen < 12 || memcmp(c->rbuf, "HTTP/1.1 101", 12) != 0) {
                char why[96];
                snprintf(why, sizeof why, "handshake refused: %.40s", (char *)c->rbuf);
                for (char *q = why; *q; q++)
                    if (*q == '\r' || *q == '\n')
                        *q = ' ';
                fail(c, why);
                return;
            }
            size_t head = (size_t)(end + 4 - c->rbuf);
            memmove(c->rbuf, c->rbuf + head, c->rlen - head);
            c->rlen -= head;
            c->state = S_OPEN;
            send_message(c);
        }
        if (c->state == S_OPEN && on_frames(c) < 0)
            return;
        if (c->state == S_DEAD)
            return;
    }
}

static int parse_url(const char *url)
{
    if (strncmp(url, "ws://", 5) != 0)
        return -1;
    const char *h = url + 5, *slash = strchr(h, '/'), *colon = strchr(h, ':');
    if (!slash)
        slash = h + strlen(h);
    if (!colon || colon > slash)
        return -1;
    snprintf(opt.host, sizeof opt.host, "%.*s", (int)(colon - h), h);
    snprintf(opt.port, sizeof opt.port, "%.*s", (int)(slash - colon - 1), colon + 1);
    snprintf(opt.path, sizeof opt.path, "%s", *slash ? slash : "/");
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double pct(double p)
{
    if (!nlat)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)(nlat - 1) + 0.5);
    return lat[i] / 1000.0;
}

int main(int argc, char **argv)
{
    const char *url = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-c") && i + 1 < argc)
            opt.conns = atoi(argv[++i]);
        else if (!strcmp(a, "-d") && i + 1 < argc)
            opt.duration = atof(argv[++i]);
        else if (!strcmp(a, "-s") && i + 1 < argc)
            opt.size = (size_t)atol(argv[++i]);
        else if (!strcmp(a, "--connect-timeout") && i + 1 < argc)
            opt.connect_timeout = atof(argv[++i]);
        else if (!strcmp(a, "--json"))
            opt.json = 1;
        else if (a[0] != '-' && !url)
            url = a;
        else {
            fprintf(stderr, "usage: wsload -c N -d SECS [-s BYTES] [--json] ws://HOST:PORT/PATH\n");
            return 2;
        }
    }
    if (!url || parse_url(url) < 0 || opt.conns < 1 || opt.size > 400 || opt.duration <= 0) {
        fprintf(stderr, "wsload: need ws://HOST:PORT/PATH, -c >= 1, -s <= 400, -d > 0\n");
        return 2;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(opt.host, opt.port, &hints, &ai) != 0) {
        fprintf(stderr, "wsload: cannot resolve %s\n", opt.host);
        return 2;
    }
    char req[1536];
    int reqlen = snprintf(req, sizeof req,
                          "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n",
                          opt.path, opt.host, opt.port);
    int ep = epoll_create1(0);
    conn *cs = calloc((size_t)opt.conns, sizeof *cs); /* freed at exit */
    if (ep < 0 || !cs) {
        perror("wsload");
        return 2;
    }
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    double t0 = now(), stop = t0 + opt.duration, connect_by = t0 + opt.connect_timeout;
    for (int i = 0; i < opt.conns; i++) {
        conn *c = &cs[i];
        c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
            fail(c, strerror(errno));
            continue;
        }
        c->state = S_CONNECTING;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    freeaddrinfo(ai);
    struct epoll_event evs[256];
    double measured_from = t0;
    for (;;) {
        double t = now();
        if (t >= stop)
            break;
        int alive = 0;
        for (int i = 0; i < opt.conns; i++)
            alive += cs[i].state != S_DEAD;
        if (!alive)
            break;
        int n = epoll_wait(ep, evs, 256, (int)((stop - t) * 1000) + 1);
        t = now();
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (c->state == S_DEAD)
                continue;
            if (c->state == S_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    fail(c, strerror(err));
                    continue;
                }
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->state = S_HANDSHAKE;
                if (send(c->fd, req, (size_t)reqlen, MSG_NOSIGNAL) != reqlen)
                    fail(c, "handshake send failed");
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                on_readable(c);
            if (c->state != S_DEAD && c->wlen)
                flush_out(c);
        }
        if (t > connect_by) {
            for (int i = 0; i < opt.conns; i++)
                if (cs[i].state == S_CONNECTING || cs[i].state == S_HANDSHAKE)
                    fail(&cs[i], "connect/handshake timeout");
        }
    }
    double elapsed = now() - measured_from;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    int used = 0;
    for (int i = 0; i < opt.conns; i++) {
        used += cs[i].used;
        if (cs[i].fd >= 0)
            close(cs[i].fd);
    }
    qsort(lat, nlat, sizeof *lat, cmp_u32);
    double rate = nlat / elapsed;
    if (opt.json) {
        printf("{\"round_trips\": %zu, \"rps\": %.1f, \"seconds\": %.3f, "
               "\"latency_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"max\": %.3f}, "
               "\"connections\": %d, \"connections_used\": %d, \"errors\": %ld, "
               "\"first_error\": \"%s\", \"client_cpu_pct\": %.1f}\n",
               nlat, rate, elapsed, pct(50), pct(90), pct(99), pct(100), opt.conns, used, errors,
               first_error, 100.0 * cpu / elapsed);
    } else {
        printf("%zu round trips in %.2f s: %.0f/s; p50 %.3f ms, p99 %.3f ms; %d/%d connections "
               "used, %ld errors%s%s\n",
               nlat, elapsed, rate, pct(50), pct(99), used, opt.conns, errors,
               first_error[0] ? ": " : "", first_error);
    }
    free(lat);
    free(cs);
    close(ep);
    return nlat ? 0 : 1;
}
