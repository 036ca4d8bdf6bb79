/* h2: nghttp2 server session per connection; fills event batches for Python.
 * See h2.h for the API contract. */
#include "h2.h"

#include <nghttp2/nghttp2.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHUNK_SIZE 16384     /* response body buffer unit (header included) */
#define CHUNK_POOL_MAX 64    /* idle chunks a connection keeps (1 MiB) */
#define STREAM_POOL_MAX 32   /* idle stream objects a connection keeps */
#define ARENA_KEEP 262144    /* arena bytes kept between batches */
#define OUT_KEEP 262144      /* output buffer bytes kept between rounds */
#define OUT_MAX FPY3_H2_OUT_MAX
#define HEAD_INITIAL 512
#define NV_STACK 64

/* Stream flags. */
#define S_SURFACED 0x01 /* REQUEST emitted: Python knows the stream */
#define S_TOO_LARGE 0x02
#define S_REJECTED 0x04 /* answered by C (431, 413): never surfaced */
#define S_RESPONDED 0x08
#define S_FIN 0x10 /* Python gave the last body byte (or the trailers) */
#define S_WANT_WRITABLE 0x20
#define S_RESET_DONE 0x40 /* RESET emitted, or Python reset it itself: no RESET event */
#define S_DEFERRED 0x80   /* the data provider waits for send() */
#define S_BODY_OVER 0x100 /* a declared Content-Length over max_body_size */
#define S_RESET_LATER 0x200 /* reset once the bytes already given are sent (reset_code) */
#define S_RST_AFTER_HEAD 0x400 /* C's own response: RST_STREAM NO_ERROR once it is sent */
#define S_HAS_HOST 0x800       /* the request has a host field */
#define S_REGULAR 0x1000       /* a regular field came: the pseudo-header fields are over */

/* The pseudo-header fields a REQUEST event carries, in this order. */
enum { P_METHOD, P_PATH, P_AUTHORITY, P_PROTOCOL, P_COUNT };

/* A unit of response body: owned by one stream's chain (or the pool). */
typedef struct chunk {
    struct chunk *next;
    uint32_t len;
    uint8_t data[];
} chunk;
#define CHUNK_CAP (CHUNK_SIZE - offsetof(chunk, data))

typedef struct h2stream {
    int32_t id;
    uint32_t flags;
    struct h2stream *prev, *next; /* the connection's open streams; next also links the pool */
    /* Request head: the pseudo-header values ("value\0", where poff/plen say), then
     * the regular fields "name\0value\0..." from reg_off. Owned by the stream object,
     * kept with it in the pool. */
    uint8_t *hbuf;
    uint32_t hlen, hcap, hcount;
    uint32_t poff[P_COUNT], plen[P_COUNT], reg_off;
    uint64_t hsize;
    uint64_t unconsumed; /* body bytes handed to Python, credit not yet given back */
    uint64_t received;   /* body bytes received */
    /* Response body chain. Owner: this stream, from fpy3_h2_send until the bytes are
     * framed into the output buffer, or the stream closes (stream_free). */
    chunk *head, *tail;
    uint32_t head_off;
    uint64_t buffered;
    uint8_t *trailers; /* "name\0value\0...": owned by the stream until sent or closed */
    size_t tlen;
    int64_t progress_ms; /* when its response last moved (for the send timeout) */
    uint32_t reset_code; /* S_RESET_LATER */
} h2stream;

struct fpy3_h2_conn {
    nghttp2_session *s;
    fpy3_h2_config cfg;
    size_t high_water, low_water;
    int broken; /* a failed allocation or a fatal error: the connection must close */
    int calm;   /* closed for a flood (ENHANCE_YOUR_CALM) */
    int phase;  /* GOAWAY sent: 1 the notice, 2 the final one */

    /* The batch Python reads; owned here, reused. REQUEST/DATA events hold arena
     * offsets in data until the batch is complete (batch_end), as the arena moves. */
    fpy3_h2_event *ev;
    size_t nev, evcap;
    uint8_t *arena;
    size_t alen, acap;
    /* Bytes to write: owned here, valid until the next output(). */
    uint8_t *out;
    size_t olen, ocap;

    h2stream *live; /* open streams C created */
    size_t nlive;
    h2stream *free_streams;
    size_t nfree_streams;
    chunk *free_chunks;
    size_t nfree_chunks;
    int64_t now_ms;
    int64_t tokens; /* control frames allowed, in thousandths */
    int64_t refilled_ms;
    nghttp2_nv *nv; /* scratch for responses with many fields; owned here */
    size_t nvcap;
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* --- pools ---------------------------------------------------------------------- */

static chunk *chunk_get(fpy3_h2_conn *c)
{
    chunk *ch = c->free_chunks;
    if (ch) {
        c->free_chunks = ch->next;
        c->nfree_chunks--;
    } else if (!(ch = malloc(CHUNK_SIZE))) { /* the caller's chain owns it */
        return NULL;
    }
    ch->next = NULL;
    ch->len = 0;
    return ch;
}

static void chunk_put(fpy3_h2_conn *c, chunk *ch)
{
    if (c->nfree_chunks >= CHUNK_POOL_MAX) {
        free(ch);
        return;
    }
    ch->next = c->free_chunks;
    c->free_chunks = ch;
    c->nfree_chunks++;
}

static h2stream *stream_new(fpy3_h2_conn *c, int32_t id)
{
    h2stream *st = c->free_streams;
    if (st) {
        c->free_streams = st->next;
        c->nfree_streams--;
        uint8_t *hbuf = st->hbuf;
        uint32_t hcap = st->hcap;
        memset(st, 0, sizeof(*st));
        st->hbuf = hbuf;
        st->hcap = hcap;
    } else if (!(st = calloc(1, sizeof(*st)))) { /* the connection's, until stream_free */
        return NULL;
    }
    st->id = id;
    st->next = c->live;
    if (c->live)
        c->live->prev = st;
    c->live = st;
    c->nlive++;
    return st;
}

static void chain_free(fpy3_h2_conn *c, h2stream *st)
{
    while (st->head) {
        chunk *h = st->head;
        st->head = h->next;
        chunk_put(c, h);
    }
    st->tail = NULL;
    st->head_off = 0;
    st->buffered = 0;
}

static void stream_free(fpy3_h2_conn *c, h2stream *st)
{
    chain_free(c, st);
    free(st->trailers);
    st->trailers = NULL;
    if (st->prev)
        st->prev->next = st->next;
    else
        c->live = st->next;
    if (st->next)
        st->next->prev = st->prev;
    c->nlive--;
    if (c->nfree_streams >= STREAM_POOL_MAX || st->hcap > 4 * HEAD_INITIAL) {
        free(st->hbuf);
        st->hbuf = NULL;
        st->hcap = 0;
    }
    if (c->nfree_streams >= STREAM_POOL_MAX) {
        free(st);
        return;
    }
    st->next = c->free_streams;
    c->free_streams = st;
    c->nfree_streams++;
}

/* --- batches ------------------------------------------------------------------------- */

static void batch_begin(fpy3_h2_conn *c)
{
    c->nev = 0;
    c->alen = 0;
    if (c->acap > ARENA_KEEP) {
        free(c->arena);
        c->arena = NULL;
        c->acap = 0;
    }
    c->now_ms = mono_ms();
}

/* Events' arena offsets become pointers, now that the arena no longer moves. */
static void batch_end(fpy3_h2_conn *c)
{
    for (size_t i = 0; i < c->nev; i++) {
        fpy3_h2_event *ev = &c->ev[i];
        if (ev->type == FPY3_H2_REQUEST || ev->type == FPY3_H2_DATA)
            ev->data = c->arena + (uintptr_t)ev->data;
    }
}

/* An event; NULL without memory (the connection is then broken). */
static fpy3_h2_event *ev_push(fpy3_h2_conn *c, int type, int32_t sid)
{
    if (c->nev == c->evcap) {
        size_t ncap = c->evcap ? c->evcap * 2 : 64;
        fpy3_h2_event *n = realloc(c->ev, ncap * sizeof(*n)); /* replaces c->ev */
        if (!n) {
            c->broken = 1;
            return NULL;
        }
        c->ev = n;
        c->evcap = ncap;
    }
    fpy3_h2_event *ev = &c->ev[c->nev++];
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
    ev->stream = sid;
    return ev;
}

/* n bytes in the arena: their offset, or -1 without memory (broken). */
static long arena_add(fpy3_h2_conn *c, const uint8_t *p, size_t n)
{
    if (c->alen + n > c->acap) {
        size_t ncap = c->acap ? c->acap : 16384;
        while (ncap < c->alen + n)
            ncap *= 2;
        uint8_t *na = realloc(c->arena, ncap); /* replaces c->arena */
        if (!na) {
            c->broken = 1;
            return -1;
        }
        c->arena = na;
        c->acap = ncap;
    }
    long off = (long)c->alen;
    memcpy(c->arena + c->alen, p, n);
    c->alen += n;
    return off;
}

/* Room for n more output bytes; -1 without memory (broken). */
static int out_reserve(fpy3_h2_conn *c, size_t n)
{
    if (c->olen + n <= c->ocap)
        return 0;
    size_t ncap = c->ocap ? c->ocap : 16384;
    while (ncap < c->olen + n)
        ncap *= 2;
    uint8_t *no = realloc(c->out, ncap); /* replaces c->out */
    if (!no) {
        c->broken = 1;
        return -1;
    }
    c->out = no;
    c->ocap = ncap;
    return 0;
}

/* --- floods -------------------------------------------------------------------------- */

/* A frame that does no work for anyone (PING, SETTINGS, PRIORITY, empty DATA): one
 * token; 0, or -1 when the bucket is dry and the connection is closed. */
static int spend_token(fpy3_h2_conn *c)
{
    int64_t burst = (int64_t)c->cfg.control_burst * 1000;
    int64_t elapsed = c->now_ms - c->refilled_ms;
    if (elapsed > 0) {
        c->tokens += elapsed * (int64_t)c->cfg.control_rate;
        if (c->tokens > burst)
            c->tokens = burst;
        c->refilled_ms = c->now_ms;
    }
    if (c->tokens < 1000) {
        if (!c->calm) {
            c->calm = 1;
            nghttp2_session_terminate_session(c->s, NGHTTP2_ENHANCE_YOUR_CALM);
        }
        return -1;
    }
    c->tokens -= 1000;
    return 0;
}

/* --- receiving ----------------------------------------------------------------------- */

static int head_append(h2stream *st, const uint8_t *p, size_t n)
{
    if (st->hlen + n + 1 > st->hcap) {
        size_t ncap = st->hcap ? st->hcap : HEAD_INITIAL;
        while (ncap < st->hlen + n + 1)
            ncap *= 2;
        uint8_t *nb = realloc(st->hbuf, ncap); /* the stream's, kept with it in the pool */
        if (!nb)
            return -1;
        st->hbuf = nb;
        st->hcap = (uint32_t)ncap;
    }
    memcpy(st->hbuf + st->hlen, p, n);
    st->hbuf[st->hlen + n] = 0;
    st->hlen += (uint32_t)(n + 1);
    return 0;
}

static int is_request(const nghttp2_frame *f)
{
    return f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST;
}

static int cb_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    fpy3_h2_conn *c = ud;
    if (!is_request(f))
        return 0;
    h2stream *st = stream_new(c, f->hd.stream_id);
    if (!st) {
        c->broken = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    nghttp2_session_set_stream_user_data(s, f->hd.stream_id, st);
    return 0;
}

static int cb_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *ud)
{
    fpy3_h2_conn *c = ud;
    (void)flags;
    if (!is_request(f))
        return 0; /* request trailers: not passed on */
    h2stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (!st || (st->flags & S_TOO_LARGE))
        return 0;
    st->hcount++;
    st->hsize += namelen + valuelen + 32;
    if (st->hcount > c->cfg.max_header_count || st->hsize > c->cfg.max_header_size) {
        st->flags |= S_TOO_LARGE; /* the rest of the block is decoded and dropped */
        return 0;
    }
    if (namelen && name[0] == ':') {
        /* nghttp2 checked them: known names, once each, before the regular fields. */
        int i = namelen == 7 && memcmp(name, ":method", 7) == 0      ? P_METHOD
                : namelen == 5 && memcmp(name, ":path", 5) == 0      ? P_PATH
                : namelen == 10 && memcmp(name, ":authority", 10) == 0 ? P_AUTHORITY
                : namelen == 9 && memcmp(name, ":protocol", 9) == 0  ? P_PROTOCOL
                                                                     : -1;
        if (i < 0)
            return 0; /* :scheme: the transport's scheme is used */
        st->poff[i] = st->hlen;
        st->plen[i] = (uint32_t)valuelen;
        if (head_append(st, value, valuelen) < 0) {
            c->broken = 1;
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
        return 0;
    }
    if (!(st->flags & S_REGULAR)) {
        st->flags |= S_REGULAR;
        st->reg_off = st->hlen;
    }
    if (namelen == 4 && memcmp(name, "host", 4) == 0)
        st->flags |= S_HAS_HOST;
    if (c->cfg.max_body_size && namelen == 14 && memcmp(name, "content-length", 14) == 0) {
        /* nghttp2 checked it is a number; more digits than fit is over any limit. */
        uint64_t n = 0;
        for (size_t i = 0; i < valuelen && n <= c->cfg.max_body_size; i++)
            n = n * 10 + (uint64_t)(value[i] - '0');
        if (n > c->cfg.max_body_size)
            st->flags |= S_BODY_OVER;
    }
    if (head_append(st, name, namelen) < 0 || head_append(st, value, valuelen) < 0) {
        c->broken = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

/* A response C makes itself (431, 413): headers only; the stream is then reset with
 * NO_ERROR if the request goes on (RFC 9113 8.1), so the client stops sending. */
static int reject(fpy3_h2_conn *c, h2stream *st, const char *status, int request_done)
{
    nghttp2_nv nv[] = {
        {(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)"0", 14, 1, NGHTTP2_NV_FLAG_NONE},
    };
    st->flags |= S_REJECTED | S_RESPONDED | S_FIN | (request_done ? 0 : S_RST_AFTER_HEAD);
    /* Not RST_STREAM now: nghttp2 would drop the response still queued before it. */
    int rv = nghttp2_submit_response(c->s, st->id, nv, 2, NULL);
    if (rv != 0 && nghttp2_is_fatal(rv)) {
        c->broken = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int cb_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    fpy3_h2_conn *c = ud;
    int32_t sid = f->hd.stream_id;
    int end = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    switch (f->hd.type) {
    case NGHTTP2_HEADERS: {
        h2stream *st = nghttp2_session_get_stream_user_data(s, sid);
        if (!st)
            return 0;
        if (!is_request(f)) { /* trailers: the body ends */
            if (end && (st->flags & S_SURFACED) && !ev_push(c, FPY3_H2_END, sid))
                return NGHTTP2_ERR_CALLBACK_FAILURE;
            return 0;
        }
        if (st->flags & S_TOO_LARGE)
            return reject(c, st, "431", end);
        if (st->flags & S_BODY_OVER)
            return reject(c, st, "413", end);
        /* The block Python reads: the pseudo-header values in a fixed order, then the
         * regular fields. */
        if (!(st->flags & S_REGULAR))
            st->reg_off = st->hlen;
        long off = (long)c->alen;
        for (int i = 0; i < P_COUNT; i++) {
            size_t n = st->plen[i] ? st->plen[i] + 1 : 0;
            if ((n ? arena_add(c, st->hbuf + st->poff[i], n) : arena_add(c, (const uint8_t *)"", 1)) < 0)
                return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
        if (arena_add(c, st->hbuf + st->reg_off, st->hlen - st->reg_off) < 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        fpy3_h2_event *ev = ev_push(c, FPY3_H2_REQUEST, sid);
        if (!ev)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        ev->data = (const uint8_t *)(uintptr_t)off;
        ev->len = c->alen - (size_t)off;
        ev->code = (st->flags & S_HAS_HOST) ? 1 : 0;
        st->flags |= S_SURFACED;
        if (end && !ev_push(c, FPY3_H2_END, sid))
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        return 0;
    }
    case NGHTTP2_DATA: {
        if (!end && f->hd.length == 0 && spend_token(c) < 0)
            return 0;
        h2stream *st = nghttp2_session_get_stream_user_data(s, sid);
        if (end && st && (st->flags & S_SURFACED) && !ev_push(c, FPY3_H2_END, sid))
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        return 0;
    }
    case NGHTTP2_PING:
    case NGHTTP2_SETTINGS:
        if (!(f->hd.flags & NGHTTP2_FLAG_ACK))
            spend_token(c);
        return 0;
    case NGHTTP2_PRIORITY:
        spend_token(c);
        return 0;
    default:
        return 0;
    }
}

static int cb_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data,
                         size_t len, void *ud)
{
    fpy3_h2_conn *c = ud;
    (void)flags;
    h2stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st || !(st->flags & S_SURFACED) || (st->flags & S_RESET_DONE)) {
        nghttp2_session_consume(s, sid, len); /* nobody will read it */
        return 0;
    }
    st->received += len;
    if (c->cfg.max_body_size && st->received > c->cfg.max_body_size) {
        /* More than the limit without a declared length: 413 if nothing was answered
         * yet, else a reset; the app sees a disconnect. */
        nghttp2_session_consume(s, sid, len);
        fpy3_h2_event *ev = ev_push(c, FPY3_H2_RESET, sid);
        if (!ev)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        ev->code = NGHTTP2_CANCEL;
        st->flags |= S_RESET_DONE;
        if (!(st->flags & S_RESPONDED))
            return reject(c, st, "413", 0);
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, sid, NGHTTP2_CANCEL);
        return 0;
    }
    /* Extend the previous DATA event when it is this stream's and ends the arena. */
    if (c->nev) {
        fpy3_h2_event *last = &c->ev[c->nev - 1];
        if (last->type == FPY3_H2_DATA && last->stream == sid &&
            (uintptr_t)last->data + last->len == c->alen) {
            if (arena_add(c, data, len) < 0)
                return NGHTTP2_ERR_CALLBACK_FAILURE;
            last->len += len;
            st->unconsumed += len;
            return 0;
        }
    }
    long off = arena_add(c, data, len);
    fpy3_h2_event *ev = off < 0 ? NULL : ev_push(c, FPY3_H2_DATA, sid);
    if (!ev)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    ev->data = (const uint8_t *)(uintptr_t)off;
    ev->len = len;
    st->unconsumed += len;
    return 0;
}

static int cb_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud)
{
    fpy3_h2_conn *c = ud;
    h2stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st)
        return 0;
    nghttp2_session_set_stream_user_data(s, sid, NULL);
    if (st->unconsumed)
        nghttp2_session_consume_connection(s, st->unconsumed);
    int rv = 0;
    if (st->flags & S_SURFACED) {
        /* Closed before the response ended, or by a reset: Python learns of it. */
        if (!(st->flags & S_RESET_DONE) && (code != NGHTTP2_NO_ERROR || !(st->flags & S_FIN))) {
            fpy3_h2_event *ev = ev_push(c, FPY3_H2_RESET, sid);
            if (ev)
                ev->code = code;
            else
                rv = NGHTTP2_ERR_CALLBACK_FAILURE;
        }
        if (!ev_push(c, FPY3_H2_CLOSED, sid))
            rv = NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    stream_free(c, st);
    return rv;
}

/* --- sending ------------------------------------------------------------------------- */

static ssize_t cb_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *ud)
{
    fpy3_h2_conn *c = ud;
    (void)s;
    (void)flags;
    if (out_reserve(c, len) < 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    memcpy(c->out + c->olen, data, len);
    c->olen += len;
    return (ssize_t)len;
}

static int submit_fields(fpy3_h2_conn *c, int32_t sid, const char *status, const uint8_t *fields,
                         size_t len, const nghttp2_data_provider *body);

static ssize_t cb_read(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length,
                       uint32_t *data_flags, nghttp2_data_source *source, void *ud)
{
    fpy3_h2_conn *c = ud;
    h2stream *st = source->ptr;
    (void)buf;
    size_t n = st->buffered < length ? (size_t)st->buffered : length;
    if (n == 0 && (st->flags & S_RESET_LATER)) {
        /* What the app gave went out (head and body): now the reset. */
        st->flags &= ~S_RESET_LATER;
        if (nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, sid, st->reset_code) != 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        return NGHTTP2_ERR_DEFERRED;
    }
    if (n == 0 && !(st->flags & S_FIN)) {
        st->flags |= S_DEFERRED;
        return NGHTTP2_ERR_DEFERRED;
    }
    *data_flags |= NGHTTP2_DATA_FLAG_NO_COPY;
    if (n == st->buffered && (st->flags & S_FIN)) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        if (st->trailers) {
            *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
            int rv = submit_fields(c, sid, NULL, st->trailers, st->tlen, NULL);
            free(st->trailers);
            st->trailers = NULL;
            if (rv != 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
    }
    return (ssize_t)n;
}

static int cb_send_data(nghttp2_session *s, nghttp2_frame *f, const uint8_t *framehd,
                        size_t length, nghttp2_data_source *source, void *ud)
{
    fpy3_h2_conn *c = ud;
    h2stream *st = source->ptr;
    (void)s;
    size_t pad = f->data.padlen;
    size_t need = 9 + length + pad;
    if (st->buffered < length)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* not reached: read and send pair up */
    if (out_reserve(c, need) < 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    uint8_t *p = c->out + c->olen;
    memcpy(p, framehd, 9);
    p += 9;
    if (pad)
        *p++ = (uint8_t)(pad - 1);
    size_t left = length;
    while (left) {
        chunk *h = st->head;
        size_t avail = h->len - st->head_off;
        size_t n = avail < left ? avail : left;
        memcpy(p, h->data + st->head_off, n);
        p += n;
        left -= n;
        st->head_off += (uint32_t)n;
        if (st->head_off == h->len && (h->next || h->len == CHUNK_CAP)) {
            st->head = h->next;
            if (!st->head)
                st->tail = NULL;
            st->head_off = 0;
            chunk_put(c, h);
        }
    }
    if (pad > 1)
        memset(p, 0, pad - 1);
    c->olen += need;
    st->buffered -= length;
    st->progress_ms = c->now_ms;
    if ((st->flags & S_WANT_WRITABLE) && st->buffered <= c->low_water) {
        st->flags &= ~S_WANT_WRITABLE;
        if (!ev_push(c, FPY3_H2_WRITABLE, st->id))
            return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    /* Whole frames only (never WOULDBLOCK, which would keep a frame of a stream that
     * may be reset meanwhile); past OUT_MAX the round ends and Python asks again. */
    return c->olen >= OUT_MAX ? NGHTTP2_ERR_PAUSE : 0;
}

static int cb_frame_send(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    (void)ud;
    if (f->hd.type != NGHTTP2_HEADERS)
        return 0;
    h2stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st && (st->flags & S_RST_AFTER_HEAD)) {
        st->flags &= ~S_RST_AFTER_HEAD;
        /* The request goes on, nobody wants it: the client may stop (RFC 9113 8.1). */
        if (nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_NO_ERROR) !=
            0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int cb_error(nghttp2_session *s, int code, const char *msg, size_t len, void *ud)
{
    (void)s;
    (void)code;
    (void)msg;
    (void)len;
    (void)ud;
    return 0;
}

/* Fields "name\0value\0..." (after an optional :status) as one HEADERS submission:
 * a response with ``body`` (NULL = no body), or trailers when status is NULL. */
static int submit_fields(fpy3_h2_conn *c, int32_t sid, const char *status, const uint8_t *fields,
                         size_t len, const nghttp2_data_provider *body)
{
    size_t nfields = 0;
    for (size_t i = 0; i < len; i++)
        nfields += fields[i] == 0;
    if (nfields & 1)
        return -1; /* names and values must pair up */
    nfields /= 2;
    size_t total = nfields + (status != NULL);
    nghttp2_nv stack_nv[NV_STACK], *nv = stack_nv;
    if (total > NV_STACK) {
        if (c->nvcap < total) {
            nghttp2_nv *n = realloc(c->nv, total * sizeof(*n)); /* replaces c->nv */
            if (!n) {
                c->broken = 1;
                return -1;
            }
            c->nv = n;
            c->nvcap = total;
        }
        nv = c->nv;
    }
    size_t i = 0;
    if (status)
        nv[i++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE};
    const uint8_t *p = fields;
    for (; i < total; i++) {
        size_t nl = strlen((const char *)p);
        const uint8_t *v = p + nl + 1;
        size_t vl = strlen((const char *)v);
        nv[i] = (nghttp2_nv){(uint8_t *)p, (uint8_t *)v, nl, vl, NGHTTP2_NV_FLAG_NONE};
        p = v + vl + 1;
    }
    /* nghttp2 copies the fields: nv and the strings need not outlive this call. */
    int rv = status ? nghttp2_submit_response(c->s, sid, nv, total, body)
                    : nghttp2_submit_trailer(c->s, sid, nv, total);
    if (rv != 0 && nghttp2_is_fatal(rv))
        c->broken = 1;
    return rv;
}

/* --- public API ---------------------------------------------------------------------- */

fpy3_h2_conn *fpy3_h2_new(const fpy3_h2_config *cfg)
{
    fpy3_h2_conn *c = calloc(1, sizeof(*c)); /* Python's, until fpy3_h2_free */
    if (!c)
        return NULL;
    c->cfg = *cfg;
    if (!c->cfg.max_header_size)
        c->cfg.max_header_size = 65536;
    if (!c->cfg.max_header_count)
        c->cfg.max_header_count = 100;
    if (!c->cfg.control_burst)
        c->cfg.control_burst = 1000;
    c->high_water = cfg->send_high_water ? cfg->send_high_water : 256 * 1024;
    c->low_water = c->high_water / 4;
    c->now_ms = c->refilled_ms = mono_ms();
    c->tokens = (int64_t)c->cfg.control_burst * 1000;

    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cbs) != 0) {
        free(c);
        return NULL;
    }
    nghttp2_session_callbacks_set_send_callback(cbs, cb_send);
    nghttp2_session_callbacks_set_send_data_callback(cbs, cb_send_data);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, cb_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, cb_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cb_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cb_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cb_stream_close);
    nghttp2_session_callbacks_set_error_callback2(cbs, cb_error);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, cb_frame_send);
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cbs);
        free(c);
        return NULL;
    }
    /* Body credit goes back as the app reads (fpy3_h2_consume), not on receipt. */
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_no_closed_streams(opt, 1);
    nghttp2_option_set_max_outbound_ack(opt, 100);
    nghttp2_option_set_max_settings(opt, 32);
    nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
    if (cfg->reset_burst)
        nghttp2_option_set_stream_reset_rate_limit(opt, cfg->reset_burst, cfg->reset_rate);
    if (cfg->max_continuations)
        nghttp2_option_set_max_continuations(opt, cfg->max_continuations);
    int rv = nghttp2_session_server_new2(&c->s, cbs, c, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0) {
        free(c);
        return NULL;
    }
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, cfg->max_concurrent_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, cfg->initial_window_size},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, cfg->max_frame_size ? cfg->max_frame_size : 16384},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)c->cfg.max_header_size},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL, cfg->enable_connect_protocol ? 1 : 0},
    };
    rv = nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
    if (rv == 0 && cfg->connection_window_size > 65535)
        rv = nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0,
                                                   (int32_t)cfg->connection_window_size);
    if (rv != 0) {
        nghttp2_session_del(c->s);
        free(c);
        return NULL;
    }
    return c;
}

void fpy3_h2_free(fpy3_h2_conn *c)
{
    if (!c)
        return;
    nghttp2_session_del(c->s); /* closes the streams: cb_stream_close frees them */
    while (c->live)
        stream_free(c, c->live);
    while (c->free_streams) {
        h2stream *st = c->free_streams;
        c->free_streams = st->next;
        free(st->hbuf);
        free(st);
    }
    while (c->free_chunks) {
        chunk *ch = c->free_chunks;
        c->free_chunks = ch->next;
        free(ch);
    }
    free(c->ev);
    free(c->arena);
    free(c->out);
    free(c->nv);
    free(c);
}

int fpy3_h2_recv(fpy3_h2_conn *c, const uint8_t *data, size_t len)
{
    batch_begin(c);
    if (c->broken)
        return -1;
    ssize_t n = nghttp2_session_mem_recv(c->s, data, len);
    batch_end(c);
    if (n < 0 || c->broken || c->calm) {
        if (n < 0 && n != NGHTTP2_ERR_CALLBACK_FAILURE && !c->calm)
            /* A protocol error nghttp2 has not answered yet (a bad preface, a flood
             * of ACKs the peer never reads): GOAWAY, if it can still go out. */
            nghttp2_session_terminate_session(c->s, n == NGHTTP2_ERR_FLOODED
                                                        ? NGHTTP2_ENHANCE_YOUR_CALM
                                                        : NGHTTP2_PROTOCOL_ERROR);
        c->broken = 1;
        return -1;
    }
    return (int)c->nev;
}

const fpy3_h2_event *fpy3_h2_events(fpy3_h2_conn *c, size_t *count)
{
    *count = c->nev;
    return c->ev;
}

const uint8_t *fpy3_h2_output(fpy3_h2_conn *c, size_t *len)
{
    int broken = c->broken;
    batch_begin(c);
    if (c->ocap > OUT_KEEP) { /* the last round's bytes were copied out */
        free(c->out);
        c->out = NULL;
        c->ocap = 0;
    }
    c->olen = 0;
    /* A broken connection still sends what it queued (its GOAWAY), nothing new. */
    int rv = nghttp2_session_send(c->s);
    if (rv != 0)
        c->broken = 1;
    c->broken |= broken;
    batch_end(c);
    *len = c->olen;
    return c->olen ? c->out : NULL;
}

int fpy3_h2_expire(fpy3_h2_conn *c, uint32_t send_timeout_ms)
{
    batch_begin(c);
    for (h2stream *st = c->live; st; st = st->next) {
        int later = (st->flags & S_RESET_LATER) != 0;
        if ((!st->buffered && !later) || (st->flags & S_REJECTED) ||
            ((st->flags & S_RESET_DONE) && !later) ||
            c->now_ms - st->progress_ms < (int64_t)send_timeout_ms)
            continue;
        st->flags = (st->flags | S_RESET_DONE) & ~(uint32_t)S_RESET_LATER;
        chain_free(c, st);
        if ((st->flags & S_SURFACED) && !later) {
            fpy3_h2_event *ev = ev_push(c, FPY3_H2_RESET, st->id);
            if (!ev)
                break;
            ev->code = NGHTTP2_CANCEL;
        }
        if (nghttp2_submit_rst_stream(c->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL) != 0)
            c->broken = 1;
    }
    batch_end(c);
    return c->broken ? -1 : (int)c->nev;
}

static h2stream *stream_of(fpy3_h2_conn *c, int32_t sid)
{
    if (c->broken)
        return NULL;
    h2stream *st = nghttp2_session_get_stream_user_data(c->s, sid);
    return st && (st->flags & S_SURFACED) ? st : NULL;
}

/* Response body bytes into the stream's chain: 0, or -1 without memory (broken). */
static int chain_append(fpy3_h2_conn *c, h2stream *st, const uint8_t *data, size_t len)
{
    if (!st->buffered)
        st->progress_ms = c->now_ms = mono_ms(); /* the send timeout counts from here */
    while (len) {
        chunk *t = st->tail;
        if (!t || t->len == CHUNK_CAP) {
            chunk *n = chunk_get(c);
            if (!n) {
                c->broken = 1;
                return -1;
            }
            if (t)
                t->next = n;
            else
                st->head = n;
            st->tail = t = n;
        }
        size_t n = CHUNK_CAP - t->len;
        if (n > len)
            n = len;
        memcpy(t->data + t->len, data, n);
        t->len += (uint32_t)n;
        data += n;
        len -= n;
        st->buffered += n;
    }
    return 0;
}

/* Python is done with the stream (its response is whole, its request ended): no more
 * events for it; credit it never gave back goes back now. */
static void forget(fpy3_h2_conn *c, h2stream *st)
{
    st->flags &= ~(uint32_t)(S_SURFACED | S_WANT_WRITABLE);
    if (st->unconsumed) {
        nghttp2_session_consume(c->s, st->id, st->unconsumed);
        st->unconsumed = 0;
    }
}

/* After body bytes were added: the data provider goes on, the marks are set. */
static int64_t after_append(fpy3_h2_conn *c, h2stream *st, int flags)
{
    if (flags & FPY3_H2_FIN)
        st->flags |= S_FIN;
    if (st->flags & S_DEFERRED) {
        st->flags &= ~S_DEFERRED;
        if (nghttp2_session_resume_data(c->s, st->id) != 0) {
            c->broken = 1;
            return -1;
        }
    }
    int64_t buffered = (int64_t)st->buffered;
    if (flags & FPY3_H2_FORGET)
        forget(c, st);
    else if (st->buffered > c->high_water && !(flags & FPY3_H2_FIN))
        st->flags |= S_WANT_WRITABLE;
    return buffered;
}

int64_t fpy3_h2_respond(fpy3_h2_conn *c, int32_t sid, int status, const char *headers,
                        size_t hlen, const uint8_t *data, size_t len, int flags)
{
    h2stream *st = stream_of(c, sid);
    if (!st || (st->flags & (S_RESPONDED | S_RESET_DONE)) || status < 100 || status > 999)
        return -1;
    char code[4] = {(char)('0' + status / 100), (char)('0' + status / 10 % 10),
                    (char)('0' + status % 10), 0};
    int only_head = (flags & FPY3_H2_FIN) && !len;
    nghttp2_data_provider body = {.source = {.ptr = st}, .read_callback = cb_read};
    if (submit_fields(c, sid, code, (const uint8_t *)headers, hlen, only_head ? NULL : &body) != 0)
        return -1;
    st->flags |= S_RESPONDED;
    st->progress_ms = mono_ms();
    if (only_head) {
        st->flags |= S_FIN;
        if (flags & FPY3_H2_FORGET)
            forget(c, st);
        return 0;
    }
    if (len && chain_append(c, st, data, len) < 0)
        return -1;
    return after_append(c, st, flags);
}

int64_t fpy3_h2_send(fpy3_h2_conn *c, int32_t sid, const uint8_t *data, size_t len, int flags)
{
    h2stream *st = stream_of(c, sid);
    if (!st || !(st->flags & S_RESPONDED) || (st->flags & (S_FIN | S_RESET_DONE)))
        return -1;
    if (len && chain_append(c, st, data, len) < 0)
        return -1;
    return after_append(c, st, flags);
}

int fpy3_h2_trailers(fpy3_h2_conn *c, int32_t sid, const char *headers, size_t len, int flags)
{
    h2stream *st = stream_of(c, sid);
    if (!st || !(st->flags & S_RESPONDED) || (st->flags & (S_FIN | S_RESET_DONE)))
        return -1;
    uint8_t *copy = malloc(len ? len : 1); /* the stream's, until sent (cb_read) or closed */
    if (!copy) {
        c->broken = 1;
        return -1;
    }
    memcpy(copy, headers, len);
    free(st->trailers);
    st->trailers = copy;
    st->tlen = len;
    return after_append(c, st, FPY3_H2_FIN | (flags & FPY3_H2_FORGET)) < 0 ? -1 : 0;
}

int fpy3_h2_consume(fpy3_h2_conn *c, int32_t sid, size_t n)
{
    h2stream *st = stream_of(c, sid);
    if (!st)
        return -1;
    if (n > st->unconsumed)
        n = (size_t)st->unconsumed;
    if (!n)
        return 0;
    st->unconsumed -= n;
    if (nghttp2_session_consume(c->s, sid, n) != 0) {
        c->broken = 1;
        return -1;
    }
    return 0;
}

int fpy3_h2_reset(fpy3_h2_conn *c, int32_t sid, uint32_t code)
{
    h2stream *st = stream_of(c, sid);
    if (!st || (st->flags & S_RESET_DONE))
        return -1;
    st->flags |= S_RESET_DONE;
    if ((st->flags & (S_RESPONDED | S_FIN)) == S_RESPONDED) {
        /* A response cut short: the head and the bytes already given go out first
         * (nghttp2 would drop a head still queued), then RST_STREAM (cb_read). */
        st->flags |= S_RESET_LATER;
        st->reset_code = code;
        st->progress_ms = mono_ms();
        if (st->flags & S_DEFERRED) {
            st->flags &= ~S_DEFERRED;
            if (nghttp2_session_resume_data(c->s, sid) != 0) {
                c->broken = 1;
                return -1;
            }
        }
        return 0;
    }
    chain_free(c, st);
    if (nghttp2_submit_rst_stream(c->s, NGHTTP2_FLAG_NONE, sid, code) != 0) {
        c->broken = 1;
        return -1;
    }
    return 0;
}

void fpy3_h2_shutdown(fpy3_h2_conn *c, int phase)
{
    if (phase <= c->phase || phase > 2 || c->broken)
        return;
    int rv;
    if (phase == 1)
        rv = nghttp2_submit_shutdown_notice(c->s);
    else
        rv = nghttp2_submit_goaway(c->s, NGHTTP2_FLAG_NONE,
                                   nghttp2_session_get_last_proc_stream_id(c->s),
                                   NGHTTP2_NO_ERROR, NULL, 0);
    if (rv != 0)
        c->broken = 1;
    c->phase = phase;
}

void fpy3_h2_terminate(fpy3_h2_conn *c, uint32_t code)
{
    if (nghttp2_session_terminate_session(c->s, code) != 0)
        c->broken = 1;
}

int fpy3_h2_alive(fpy3_h2_conn *c)
{
    if (c->broken)
        return 0;
    return nghttp2_session_want_read(c->s) || nghttp2_session_want_write(c->s);
}

size_t fpy3_h2_open_streams(fpy3_h2_conn *c) { return c->nlive; }

int fpy3_h2_want_output(fpy3_h2_conn *c) { return nghttp2_session_want_write(c->s); }
