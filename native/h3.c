/* h3: nghttp3 per connection over engine.h; fills the event batch for Python.
 * See h3.h for the API contract. Knows nothing of the engine underneath. */
#include "h3.h"

#include "engine.h"

#include <arpa/inet.h>
#include <nghttp3/nghttp3.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

_Static_assert(sizeof(fpy3_vec) == sizeof(nghttp3_vec), "fpy3_vec must match nghttp3_vec");

#define CHUNK_SIZE 16384       /* response body buffer unit (header included) */
#define CHUNK_POOL_MAX 1024    /* idle chunks kept for reuse (16 MiB) */
#define STREAM_POOL_MAX 4096   /* idle stream objects kept for reuse */
#define ARENA_BLOCK 65536      /* event data arena unit */
#define ARENA_KEEP (1u << 20)  /* arena bytes kept between batches */
#define HEAD_INITIAL 512       /* first request-head buffer of a stream */
#define NV_STACK 64

/* Stream flags. */
#define S_SURFACED 0x01 /* REQUEST emitted: Python knows the stream */
#define S_DISCARD 0x02  /* never surfaced: malformed or answered 431 by C */
#define S_TOO_LARGE 0x04
#define S_RESPONDED 0x08
#define S_FIN 0x10      /* Python sent the last body byte */
#define S_WANT_WRITABLE 0x20
#define S_RESET_DONE 0x40 /* RESET emitted, or Python reset it itself: no RESET event */
#define S_WR_SHUT 0x80    /* the write side is gone (peer STOP_SENDING or reset) */
#define S_BODY_DONE 0x100 /* the request ended (FIN): nothing more to wait for */
#define S_CONNECT 0x200   /* CONNECT (a websocket): its body never ends */
#define S_SCANNED 0x400   /* the first HEADERS frame's field lines are counted */

/* An auto-tuned receive window (a stream's or a connection's). */
typedef struct {
    uint64_t size;   /* the window the peer has, bytes */
    uint64_t credit; /* given back since the last window update */
    uint64_t ts;     /* that update's time (ns); 0 = none yet */
} rwin;

/* Counts the field lines of a request's first HEADERS frame on the wire (RFC 9114 7.2,
 * RFC 9204 4.5) without decoding them (no table needed): nghttp3 passes up only the
 * fields it accepts and silently drops some that make a request malformed (a name
 * with a space or a colon, a value with CR, LF or NUL, RFC 9114 4.1.2 and 10.3).
 * Fewer fields passed up than lines on the wire means one was dropped. */
typedef struct {
    uint8_t state, after, skip_then, vlen, vgot;
    uint32_t shift;
    uint32_t lines;
    uint64_t val;  /* the integer being read */
    uint64_t type; /* the frame's type */
    uint64_t left; /* payload bytes left in the frame */
    uint64_t skip; /* string bytes left to skip */
} fscan;

/* A unit of response body: owned by one stream's chain (or the free pool). */
typedef struct chunk {
    struct chunk *next;
    uint32_t len; /* bytes filled */
    uint8_t data[];
} chunk;
#define CHUNK_CAP (CHUNK_SIZE - offsetof(chunk, data))

typedef struct h3conn h3conn;

typedef struct stream {
    int64_t id;
    h3conn *c;
    struct stream *prev, *next; /* the connection's live streams; next also links pools */
    uint32_t flags;
    uint32_t promised; /* final events (RESET, CLOSED) with room kept in the batches */
    /* Request head "name\0value\0...": owned by the stream object and kept with it
     * in the pool; an event points here until the object is reused (next batch). */
    uint8_t *hbuf;
    uint32_t hlen, hcap;
    uint32_t hcount;
    uint64_t hsize;
    uint64_t unconsumed; /* body bytes handed to Python, credit not yet given back */
    /* Response body chain. Owner: this stream, from fpy3_h3_send until the bytes are
     * acked (freed in chain_ack) or the stream/connection closes (stream_release). */
    chunk *head, *tail, *rd;
    uint32_t rd_off;   /* next byte of rd to hand to nghttp3 */
    uint32_t head_off; /* first unacked byte of head */
    uint64_t buffered; /* appended and not yet acked */
    /* Trailer fields "name\0value\0...": owned by the stream from fpy3_h3_trailers
     * until submitted (read_data) or the stream is released. */
    uint8_t *trailers;
    size_t tlen;
    rwin win;          /* the request's flow-control window */
    uint64_t rx_ts;    /* the request's last progress (bytes in, or window given), ns */
    uint64_t tx_ts;    /* the response's last progress (bytes acked, or queued), ns */
    uint32_t nfields;  /* head fields nghttp3 passed up */
    fscan scan;        /* head field lines on the wire */
} stream;

typedef struct {
    stream **slots; /* owned by the map; the streams are the connection's */
    uint32_t cap, n;
} smap;

/* Owned by the engine's connection (its app state) from conn_open to conn_close,
 * then a zombie until the next batch begins, as REQUEST events point at peer/local. */
struct h3conn {
    fpy3_h3_server *s;
    fpy3_qconn *qc; /* NULL once the engine closed the connection */
    nghttp3_conn *h3;
    uint64_t handle;
    smap streams;
    stream *live;
    h3conn *next; /* zombie list / pending-close list */
    uint64_t close_code;
    int close_pending;
    int goaway;      /* GOAWAY sent: 1 the notice, 2 the final one */
    int peer_goaway; /* the client sent GOAWAY */
    int peer_port, local_port;
    char peer[INET6_ADDRSTRLEN];
    char local[INET6_ADDRSTRLEN];
    rwin win; /* the connection's flow-control window */
    /* On the server's idle list (no request stream open), oldest first. */
    h3conn *iprev, *inext;
    int idle;
    h3conn *enext; /* on the evicted list: GOAWAY sent, CONNECTION_CLOSE next batch */
    int evicted;
};

typedef struct ablock {
    struct ablock *next;
    size_t used, cap;
    uint8_t data[];
} ablock;

struct fpy3_h3_server {
    fpy3_engine *e;
    size_t max_header_size, max_header_count;
    int connect_protocol; /* SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 9220 websockets) */
    uint64_t max_streams_bidi;
    size_t high_water, low_water;
    int shutting_down; /* 0, 1: GOAWAY notice sent, 2: final GOAWAY sent */

    fpy3_h3_event *ev; /* the batch Python reads; owned here, reused */
    size_t nev, evcap;
    /* Events raised while flushing or closing all (resets, closes; they carry no
     * bytes) wait here for the next read/expire batch, so those calls never
     * invalidate or extend the batch Python may still be reading. */
    fpy3_h3_event *pend;
    size_t npend, pendcap;
    int in_flush;
    /* Room kept in both arrays for every final event still promised: a surfaced
     * stream's RESET and CLOSED must reach Python even when memory runs out, as they
     * may be raised where nothing can fail any more (the connection already gone). */
    size_t reserved;
    ablock *arena;      /* current block first */
    ablock *arena_full; /* filled blocks of this batch */

    stream *free_streams, *zombie_streams;
    size_t nfree_streams;
    chunk *free_chunks;
    size_t nfree_chunks;
    h3conn *zombie_conns;
    h3conn *pending_close;
    nghttp3_nv *nv; /* scratch for respond() with many fields; owned here */
    size_t nvcap;
    fpy3_h3_stats stats;

    /* Request bodies: windows and what waits for the app, worker-wide. */
    uint64_t init_window, init_stream_window, max_window, max_stream_window;
    uint64_t unread;        /* body bytes handed to Python and not consumed */
    uint64_t unread_budget; /* past it, windows stop growing */
    /* Deadlines (ns; 0 = off), checked by a sweep while streams are live. */
    uint64_t body_timeout, send_timeout;
    uint64_t sweep_every, next_sweep;
    uint64_t now; /* at the start of the current read/expire */
    size_t nlive; /* streams of all connections */
    uint64_t body_timeouts, send_timeouts, malformed;
    /* Connections without a request stream, longest idle first: past max_idle the
     * first go (an abandoned connection is one, until its idle timeout). */
    h3conn *idle_head, *idle_tail;
    size_t nidle, max_idle;
    uint64_t idle_closed;
    h3conn *evicted;
};

const uint32_t fpy3_h3_rtt_bounds_us[10] = {1000,   5000,   10000,  25000,   50000,
                                            100000, 250000, 500000, 1000000, 2500000};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* --- pools ------------------------------------------------------------------------- */

static chunk *chunk_get(fpy3_h3_server *s)
{
    chunk *ch = s->free_chunks;
    if (ch) {
        s->free_chunks = ch->next;
        s->nfree_chunks--;
    } else if (!(ch = malloc(CHUNK_SIZE))) { /* the caller's chain owns it */
        return NULL;
    }
    ch->next = NULL;
    ch->len = 0;
    return ch;
}

static void chunk_put(fpy3_h3_server *s, chunk *ch)
{
    if (s->nfree_chunks >= CHUNK_POOL_MAX) {
        free(ch);
        return;
    }
    ch->next = s->free_chunks;
    s->free_chunks = ch;
    s->nfree_chunks++;
}

static stream *stream_get(fpy3_h3_server *s)
{
    stream *st = s->free_streams;
    if (st) {
        s->free_streams = st->next;
        s->nfree_streams--;
        uint8_t *hbuf = st->hbuf;
        uint32_t hcap = st->hcap;
        memset(st, 0, sizeof(*st));
        st->hbuf = hbuf;
        st->hcap = hcap;
        return st;
    }
    return calloc(1, sizeof(*st)); /* the caller's connection owns it */
}

static void stream_free_now(fpy3_h3_server *s, stream *st)
{
    if (s->nfree_streams >= STREAM_POOL_MAX || st->hcap > 4 * HEAD_INITIAL) {
        free(st->hbuf);
        st->hbuf = NULL;
        st->hcap = 0;
    }
    if (s->nfree_streams >= STREAM_POOL_MAX) {
        free(st);
        return;
    }
    st->next = s->free_streams;
    s->free_streams = st;
    s->nfree_streams++;
}

/* --- per-connection stream map (client bidi ids are 0, 4, 8...: dense) ----------- */

static stream *smap_find(const smap *m, int64_t id)
{
    if (!m->cap)
        return NULL;
    uint32_t mask = m->cap - 1;
    for (uint32_t i = (uint32_t)((uint64_t)id >> 2) & mask;; i = (i + 1) & mask) {
        stream *st = m->slots[i];
        if (!st)
            return NULL;
        if (st->id == id)
            return st;
    }
}

static int smap_put(smap *m, stream *st)
{
    if ((m->n + 1) * 2 > m->cap) {
        uint32_t ncap = m->cap ? m->cap * 2 : 16;
        stream **ns = calloc(ncap, sizeof(*ns)); /* replaces m->slots */
        if (!ns)
            return -1;
        for (uint32_t i = 0; i < m->cap; i++) {
            stream *o = m->slots[i];
            if (!o)
                continue;
            uint32_t j = (uint32_t)((uint64_t)o->id >> 2) & (ncap - 1);
            while (ns[j])
                j = (j + 1) & (ncap - 1);
            ns[j] = o;
        }
        free(m->slots);
        m->slots = ns;
        m->cap = ncap;
    }
    uint32_t mask = m->cap - 1, i = (uint32_t)((uint64_t)st->id >> 2) & mask;
    while (m->slots[i])
        i = (i + 1) & mask;
    m->slots[i] = st;
    m->n++;
    return 0;
}

static void smap_del(smap *m, const stream *st)
{
    if (!m->cap)
        return;
    uint32_t mask = m->cap - 1, i = (uint32_t)((uint64_t)st->id >> 2) & mask;
    for (;; i = (i + 1) & mask) {
        if (!m->slots[i])
            return;
        if (m->slots[i] == st)
            break;
    }
    m->slots[i] = NULL;
    m->n--;
    for (uint32_t j = (i + 1) & mask; m->slots[j]; j = (j + 1) & mask) {
        uint32_t home = (uint32_t)((uint64_t)m->slots[j]->id >> 2) & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = m->slots[j];
            m->slots[j] = NULL;
            i = j;
        }
    }
}

/* --- head field lines on the wire (fscan) -------------------------------------------- */

enum { FS_TYPE, FS_LEN, FS_SKIPFRAME, FS_RIC, FS_BASE, FS_LINE, FS_INT, FS_STR, FS_SKIP,
       FS_DONE, FS_BAD };
/* What an integer of the field section is for. */
enum { FA_RIC, FA_BASE, FA_LINE_END, FA_VALUE, FA_NAME_LEN, FA_VALUE_LEN };

static void fscan_skip(fscan *f, uint64_t n, uint8_t then)
{
    f->skip = n;
    f->skip_then = then;
    f->state = n ? FS_SKIP : then;
}

static void fscan_int_done(fscan *f, uint64_t v)
{
    switch (f->after) {
    case FA_RIC:
        f->state = FS_BASE;
        break;
    case FA_BASE:
    case FA_LINE_END:
        f->state = FS_LINE;
        break;
    case FA_VALUE:
        f->state = FS_STR;
        break;
    case FA_NAME_LEN:
        fscan_skip(f, v, FS_STR);
        break;
    default: /* FA_VALUE_LEN */
        fscan_skip(f, v, FS_LINE);
        break;
    }
}

/* A prefix integer (RFC 7541 5.1) starting in b's low nbits. */
static void fscan_int(fscan *f, uint8_t b, unsigned nbits, uint8_t after)
{
    uint8_t mask = (uint8_t)((1u << nbits) - 1);
    f->after = after;
    if ((b & mask) < mask) {
        fscan_int_done(f, b & mask);
        return;
    }
    f->val = mask;
    f->shift = 0;
    f->state = FS_INT;
}

static void fscan_byte(fscan *f, uint8_t b)
{
    switch (f->state) {
    case FS_RIC:
        fscan_int(f, b, 8, FA_RIC);
        break;
    case FS_BASE:
        fscan_int(f, b, 7, FA_BASE); /* the sign bit above */
        break;
    case FS_LINE: /* RFC 9204 4.5.2-4.5.6 */
        f->lines++;
        if (b & 0x80)
            fscan_int(f, b, 6, FA_LINE_END); /* indexed */
        else if (b & 0x40)
            fscan_int(f, b, 4, FA_VALUE); /* literal, name reference */
        else if (b & 0x20)
            fscan_int(f, b, 3, FA_NAME_LEN); /* literal, literal name */
        else if (b & 0x10)
            fscan_int(f, b, 4, FA_LINE_END); /* indexed, post-base */
        else
            fscan_int(f, b, 3, FA_VALUE); /* literal, post-base name reference */
        break;
    case FS_STR:
        fscan_int(f, b, 7, FA_VALUE_LEN); /* the Huffman bit above */
        break;
    case FS_INT:
        if (f->shift > 56) {
            f->state = FS_BAD;
            break;
        }
        f->val += (uint64_t)(b & 0x7f) << f->shift;
        f->shift += 7;
        if (!(b & 0x80))
            fscan_int_done(f, f->val);
        break;
    default:
        f->state = FS_BAD;
    }
}

/* Stream bytes as they arrive, up to the end of the first HEADERS frame (FS_DONE with
 * f->lines set, or FS_BAD when it cannot be counted: nghttp3 then judges alone). */
static void fscan_feed(fscan *f, const uint8_t *p, size_t n)
{
    while (n && f->state != FS_DONE && f->state != FS_BAD) {
        if (f->state == FS_TYPE || f->state == FS_LEN) { /* QUIC varints (RFC 9000 16) */
            uint8_t b = *p++;
            n--;
            if (f->vgot == 0) {
                f->vlen = (uint8_t)(1u << (b >> 6));
                f->val = b & 0x3f;
            } else {
                f->val = f->val << 8 | b;
            }
            if (++f->vgot < f->vlen)
                continue;
            f->vgot = 0;
            if (f->state == FS_TYPE) {
                f->type = f->val;
                f->state = FS_LEN;
            } else {
                f->left = f->val;
                /* Frames before the head (reserved types) are skipped. */
                f->state = f->type != 0x01 ? FS_SKIPFRAME : f->left ? FS_RIC : FS_BAD;
                if (f->state == FS_SKIPFRAME && !f->left)
                    f->state = FS_TYPE;
            }
            continue;
        }
        size_t k = n < f->left ? n : (size_t)f->left;
        if (f->state == FS_SKIPFRAME) {
            f->left -= k;
            p += k;
            n -= k;
            if (!f->left)
                f->state = FS_TYPE;
            continue;
        }
        if (f->state == FS_SKIP) {
            if (k > f->skip)
                k = (size_t)f->skip;
            f->skip -= k;
            if (!f->skip)
                f->state = f->skip_then;
        } else {
            k = 1;
            fscan_byte(f, *p);
        }
        f->left -= k;
        p += k;
        n -= k;
        if (!f->left && f->state != FS_BAD) /* the section ends between two lines */
            f->state = f->state == FS_LINE ? FS_DONE : FS_BAD;
    }
}

/* --- event batch ------------------------------------------------------------------- */

static int ev_reserve(fpy3_h3_event **arr, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap : 256;
    while (ncap < need)
        ncap *= 2;
    fpy3_h3_event *n = realloc(*arr, ncap * sizeof(*n));
    if (!n)
        return -1;
    *arr = n;
    *cap = ncap;
    return 0;
}

/* Room for k more events on top of those promised, in the array pushes go to now
 * and in the one they may go to later; the batch array also holds what waits in
 * pend, as batch_begin moves it there. */
static int ev_room(fpy3_h3_server *s, size_t k)
{
    size_t need = s->reserved + k, cur = s->nev > s->npend ? s->nev : s->npend;
    if (ev_reserve(&s->ev, &s->evcap, cur + need) < 0 ||
        ev_reserve(&s->pend, &s->pendcap, s->npend + need) < 0)
        return -1;
    return 0;
}

static fpy3_h3_event *ev_add(fpy3_h3_server *s, int type, h3conn *c, int64_t sid)
{
    fpy3_h3_event *ev = s->in_flush ? &s->pend[s->npend++] : &s->ev[s->nev++];
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
    ev->conn = c->handle;
    ev->stream = sid;
    if (c->qc)
        fpy3_engine_defer(c->qc); /* Python will flush after this batch */
    return ev;
}

/* An event; NULL when there is no memory for it, which must fail the connection. */
static fpy3_h3_event *ev_push(fpy3_h3_server *s, int type, h3conn *c, int64_t sid)
{
    return ev_room(s, 1) < 0 ? NULL : ev_add(s, type, c, sid);
}

/* A surfaced stream's RESET or CLOSED: never fails, its room was kept (promise). */
static fpy3_h3_event *ev_push_final(fpy3_h3_server *s, int type, h3conn *c, stream *st)
{
    if (st->promised) {
        st->promised--;
        s->reserved--;
    } else if (ev_room(s, 1) < 0) {
        return NULL; /* not reached: every surfaced stream holds two promises */
    }
    return ev_add(s, type, c, st->id);
}

/* The stream is surfacing: room for its REQUEST event now and its final ones later. */
static int ev_promise(fpy3_h3_server *s, stream *st)
{
    if (ev_room(s, 3) < 0)
        return -1;
    st->promised = 2;
    s->reserved += 2;
    return 0;
}

/* n bytes in the batch arena, valid until the next batch begins. */
static uint8_t *arena_alloc(fpy3_h3_server *s, size_t n)
{
    ablock *b = s->arena;
    if (b && b->cap - b->used >= n) {
        uint8_t *p = b->data + b->used;
        b->used += n;
        return p;
    }
    size_t cap = n > ARENA_BLOCK ? n : ARENA_BLOCK;
    ablock *nb = malloc(sizeof(ablock) + cap); /* the server's arena; batch_begin frees it */
    if (!nb)
        return NULL;
    nb->cap = cap;
    nb->used = n;
    if (b) {
        s->arena = b->next; /* unlink current, park it as full */
        b->next = s->arena_full;
        s->arena_full = b;
    }
    nb->next = s->arena;
    s->arena = nb;
    return nb->data;
}

/* Start of read/expire: the last batch is done with; events a flush raised lead. */
static void batch_begin(fpy3_h3_server *s)
{
    s->now = mono_ns();
    /* ev has room for all of pend (ev_room): nothing is dropped here. */
    if (s->npend)
        memcpy(s->ev, s->pend, s->npend * sizeof(*s->ev));
    s->nev = s->npend;
    s->npend = 0;
    /* Arena: keep up to ARENA_KEEP bytes of blocks, emptied. */
    size_t kept = 0;
    ablock *all = s->arena_full, *keep = NULL;
    if (s->arena) {
        ablock *t = s->arena;
        while (t->next)
            t = t->next;
        t->next = all;
        all = s->arena;
    }
    while (all) {
        ablock *b = all;
        all = b->next;
        if (b->cap == ARENA_BLOCK && kept + b->cap <= ARENA_KEEP) {
            b->used = 0;
            b->next = keep;
            keep = b;
            kept += b->cap;
        } else {
            free(b);
        }
    }
    s->arena = keep;
    s->arena_full = NULL;
    /* Objects events of the last batch pointed into can go now. */
    while (s->zombie_streams) {
        stream *st = s->zombie_streams;
        s->zombie_streams = st->next;
        stream_free_now(s, st);
    }
    while (s->zombie_conns) {
        h3conn *c = s->zombie_conns;
        s->zombie_conns = c->next;
        free(c->streams.slots);
        free(c);
    }
}

/* Body bytes to Python: 0, or -1 without memory for them (the connection must fail). */
static int emit_data(fpy3_h3_server *s, h3conn *c, stream *st, const uint8_t *data, size_t len)
{
    /* Extend the previous DATA event when its bytes end where the arena is. */
    if (s->nev) {
        fpy3_h3_event *last = &s->ev[s->nev - 1];
        ablock *b = s->arena;
        if (last->type == FPY3_H3_DATA && last->conn == c->handle && last->stream == st->id && b &&
            last->data + last->len == b->data + b->used && b->cap - b->used >= len) {
            memcpy(b->data + b->used, data, len);
            b->used += len;
            last->len += len;
            return 0;
        }
    }
    uint8_t *p = arena_alloc(s, len);
    fpy3_h3_event *ev = p ? ev_push(s, FPY3_H3_DATA, c, st->id) : NULL;
    if (!ev)
        return -1;
    memcpy(p, data, len);
    ev->data = p;
    ev->len = len;
    return 0;
}

/* --- response body chain ----------------------------------------------------------- */

static int chain_append(fpy3_h3_server *s, stream *st, const uint8_t *data, size_t len)
{
    while (len) {
        chunk *t = st->tail;
        if (!t || t->len == CHUNK_CAP) {
            chunk *n = chunk_get(s);
            if (!n)
                return -1;
            if (t)
                t->next = n;
            else
                st->head = n;
            st->tail = t = n;
            if (!st->rd) {
                st->rd = n;
                st->rd_off = 0;
            }
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

static void chain_ack(fpy3_h3_server *s, stream *st, uint64_t n)
{
    st->buffered -= n < st->buffered ? n : st->buffered;
    while (n && st->head) {
        chunk *h = st->head;
        uint64_t avail = h->len - st->head_off;
        if (n < avail) {
            st->head_off += (uint32_t)n;
            return;
        }
        n -= avail;
        /* Wholly acked, so wholly handed out: rd is at or past its end. */
        st->head = h->next;
        if (st->rd == h) {
            st->rd = h->next;
            st->rd_off = 0;
        }
        if (st->tail == h)
            st->tail = NULL;
        st->head_off = 0;
        chunk_put(s, h);
    }
}

static void chain_free(fpy3_h3_server *s, stream *st)
{
    free(st->trailers);
    st->trailers = NULL;
    while (st->head) {
        chunk *h = st->head;
        st->head = h->next;
        chunk_put(s, h);
    }
    st->tail = st->rd = NULL;
    st->buffered = 0;
}

static int submit_fields(fpy3_h3_server *s, h3conn *c, int64_t sid, const char *status,
                         const char *fields, size_t len, const nghttp3_data_reader *body);

static nghttp3_ssize read_data(nghttp3_conn *h3, int64_t sid, nghttp3_vec *vec, size_t veccnt,
                               uint32_t *pflags, void *cud, void *sud)
{
    (void)h3;
    h3conn *c = cud;
    stream *st = sud;
    size_t n = 0;
    while (st->rd && n < veccnt) {
        chunk *r = st->rd;
        if (st->rd_off < r->len) {
            vec[n].base = r->data + st->rd_off;
            vec[n].len = r->len - st->rd_off;
            n++;
            st->rd_off = r->len;
        }
        if (!r->next)
            break;
        st->rd = r->next;
        st->rd_off = 0;
    }
    if (st->flags & S_FIN) {
        chunk *r = st->rd;
        if (!r || (st->rd_off == r->len && !r->next)) {
            *pflags |= NGHTTP3_DATA_FLAG_EOF;
            if (st->trailers) {
                *pflags |= NGHTTP3_DATA_FLAG_NO_END_STREAM;
                int rv = submit_fields(c->s, c, sid, NULL, (const char *)st->trailers, st->tlen,
                                       NULL);
                free(st->trailers);
                st->trailers = NULL;
                if (rv != 0)
                    return NGHTTP3_ERR_CALLBACK_FAILURE;
            }
        }
    } else if (n == 0) {
        return NGHTTP3_ERR_WOULDBLOCK;
    }
    return (nghttp3_ssize)n;
}

static const nghttp3_data_reader body_reader = {.read_data = read_data};

/* --- idle connections -------------------------------------------------------------- */

static void conn_close_later(h3conn *c, uint64_t code);
static void send_goaway(h3conn *c, int phase);

static void idle_del(h3conn *c)
{
    fpy3_h3_server *s = c->s;
    if (!c->idle)
        return;
    if (c->iprev)
        c->iprev->inext = c->inext;
    else
        s->idle_head = c->inext;
    if (c->inext)
        c->inext->iprev = c->iprev;
    else
        s->idle_tail = c->iprev;
    c->iprev = c->inext = NULL;
    c->idle = 0;
    s->nidle--;
}

/* c has no request stream open any more. Past max_idle such connections, the one idle
 * longest is closed as a graceful shutdown would: the final GOAWAY goes out with the
 * next flush (a request the client sent meanwhile is one it may retry), and
 * CONNECTION_CLOSE with H3_NO_ERROR at the start of the next batch (evicted_close). A
 * client that vanished holds nothing for long; a live one reconnects. */
static void idle_push(h3conn *c)
{
    fpy3_h3_server *s = c->s;
    if (c->idle || !c->qc || c->close_pending || c->evicted)
        return;
    c->idle = 1;
    c->inext = NULL;
    c->iprev = s->idle_tail;
    if (s->idle_tail)
        s->idle_tail->inext = c;
    else
        s->idle_head = c;
    s->idle_tail = c;
    s->nidle++;
    while (s->max_idle && s->nidle > s->max_idle) {
        h3conn *old = s->idle_head;
        idle_del(old);
        s->idle_closed++;
        send_goaway(old, 2);
        old->evicted = 1;
        old->enext = s->evicted;
        s->evicted = old;
    }
}

static void evicted_del(h3conn *c)
{
    if (!c->evicted)
        return;
    for (h3conn **p = &c->s->evicted; *p; p = &(*p)->enext)
        if (*p == c) {
            *p = c->enext;
            break;
        }
    c->evicted = 0;
}

/* Their GOAWAY went out with the last flush: now the CONNECTION_CLOSE. */
static void evicted_close(fpy3_h3_server *s)
{
    while (s->evicted) {
        h3conn *c = s->evicted;
        s->evicted = c->enext;
        c->evicted = 0;
        conn_close_later(c, FPY3_H3_NO_ERROR);
    }
}

/* --- stream lifecycle -------------------------------------------------------------- */

static void stream_unlink(h3conn *c, stream *st)
{
    c->s->nlive--;
    if (st->prev)
        st->prev->next = st->next;
    else
        c->live = st->next;
    if (st->next)
        st->next->prev = st->prev;
    st->prev = st->next = NULL;
    smap_del(&c->streams, st);
}

/* The stream is gone: tell Python (if it knows it), give back unconsumed credit,
 * free its body buffers, and park the object until the next batch. */
static void stream_release(h3conn *c, stream *st, uint64_t code)
{
    fpy3_h3_server *s = c->s;
    if (st->flags & S_SURFACED) {
        if (!(st->flags & (S_RESET_DONE | S_FIN))) {
            fpy3_h3_event *ev = ev_push_final(s, FPY3_H3_RESET, c, st);
            if (ev)
                ev->code = code;
        }
        ev_push_final(s, FPY3_H3_CLOSED, c, st);
        s->reserved -= st->promised; /* a RESET never raised */
        st->promised = 0;
    }
    if (c->qc && st->unconsumed)
        fpy3_engine_extend(c->qc, -1, st->unconsumed); /* connection window only */
    s->unread -= st->unconsumed;
    st->unconsumed = 0;
    chain_free(s, st);
    stream_unlink(c, st);
    st->next = s->zombie_streams;
    s->zombie_streams = st;
    if (!c->live)
        idle_push(c);
}

static h3conn *conn_of(fpy3_h3_server *s, uint64_t handle)
{
    h3conn *c = fpy3_engine_conn_find(s->e, handle);
    return c && c->qc ? c : NULL;
}

static stream *stream_of(fpy3_h3_server *s, uint64_t handle, int64_t sid, h3conn **pc)
{
    h3conn *c = conn_of(s, handle);
    if (!c)
        return NULL;
    stream *st = smap_find(&c->streams, sid);
    if (!st || !(st->flags & S_SURFACED))
        return NULL;
    *pc = c;
    return st;
}

/* An error outside engine callbacks: close on the next flush (not now, so the
 * batch Python is reading is not appended to). */
static void conn_close_later(h3conn *c, uint64_t code)
{
    if (c->close_pending)
        return;
    c->close_pending = 1;
    c->close_code = code;
    c->next = c->s->pending_close;
    c->s->pending_close = c;
}

/* Graceful shutdown in two steps (RFC 9114 5.2): first a GOAWAY notice that lets
 * nothing be cut (requests already on their way are still taken), and about one
 * round trip later the final GOAWAY with the last stream id we will answer. */
static void send_goaway(h3conn *c, int phase)
{
    if (c->goaway >= phase)
        return;
    int rv = phase == 1 ? nghttp3_conn_submit_shutdown_notice(c->h3) : nghttp3_conn_shutdown(c->h3);
    if (rv != 0) {
        conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
        return;
    }
    c->goaway = phase;
    fpy3_engine_mark(c->qc);
}

/* --- nghttp3 callbacks -------------------------------------------------------------- */

/* No memory for what the peer sent: the connection closes with H3_INTERNAL_ERROR
 * (nghttp3 passes the failure up to the engine callback, which fails). */
static int oom(h3conn *c)
{
    fpy3_engine_conn_error(c->qc, FPY3_H3_INTERNAL_ERROR);
    return NGHTTP3_ERR_CALLBACK_FAILURE;
}

/* A request stream's object, made when its first bytes arrive: NULL without memory. */
static stream *stream_open(h3conn *c, int64_t sid)
{
    fpy3_h3_server *s = c->s;
    stream *st = stream_get(s);
    if (!st)
        return NULL;
    st->id = sid;
    st->c = c;
    if (smap_put(&c->streams, st) < 0) {
        stream_free_now(s, st);
        return NULL;
    }
    st->next = c->live;
    if (c->live)
        c->live->prev = st;
    else
        idle_del(c); /* an evicted one still closes: its GOAWAY refused this stream */
    c->live = st;
    s->nlive++;
    st->win.size = s->init_stream_window;
    st->rx_ts = s->now;
    return st;
}

static int h_begin_headers(nghttp3_conn *h3, int64_t sid, void *cud, void *sud)
{
    h3conn *c = cud;
    (void)sud;
    stream *st = smap_find(&c->streams, sid);
    if (!st && !(st = stream_open(c, sid)))
        return oom(c);
    nghttp3_conn_set_stream_user_data(h3, sid, st);
    return 0;
}

static int head_append(stream *st, const uint8_t *p, size_t n)
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

static int h_recv_header(nghttp3_conn *h3, int64_t sid, int32_t token, nghttp3_rcbuf *name,
                         nghttp3_rcbuf *value, uint8_t flags, void *cud, void *sud)
{
    h3conn *c = cud;
    stream *st = sud;
    (void)h3;
    (void)sid;
    (void)token;
    (void)flags;
    if (!st)
        return 0;
    st->nfields++;
    if (st->flags & S_TOO_LARGE)
        return 0;
    nghttp3_vec n = nghttp3_rcbuf_get_buf(name), v = nghttp3_rcbuf_get_buf(value);
    st->hcount++;
    st->hsize += n.len + v.len + 32;
    if (st->hcount > c->s->max_header_count || st->hsize > c->s->max_header_size) {
        st->flags |= S_TOO_LARGE;
        return 0;
    }
    if (head_append(st, n.base, n.len) < 0 || head_append(st, v.base, v.len) < 0)
        return oom(c);
    return 0;
}

/* A request nghttp3 accepted that RFC 9114 still makes malformed (4.1.2): reset with
 * H3_MESSAGE_ERROR, as nghttp3 does its own; Python never sees it. */
static void malformed(h3conn *c, stream *st)
{
    c->s->malformed++;
    st->flags |= S_DISCARD | S_WR_SHUT;
    fpy3_engine_shutdown_stream(c->qc, st->id, FPY3_H3_MESSAGE_ERROR, FPY3_SHUT_RD | FPY3_SHUT_WR);
}

static int ascii_caseeq(const uint8_t *a, const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t x = a[i], y = b[i];
        if (x >= 'A' && x <= 'Z')
            x = (uint8_t)(x + 32);
        if (y >= 'A' && y <= 'Z')
            y = (uint8_t)(y + 32);
        if (x != y)
            return 0;
    }
    return 1;
}

/* What nghttp3 leaves to the server: a fragment in :path (a request target has none,
 * RFC 9114 4.3.1), and a Host other than :authority (4.3.1: they MUST agree). Also
 * marks CONNECT streams. 0: well-formed. */
static int head_check(stream *st)
{
    const uint8_t *auth = NULL, *host = NULL;
    size_t alen = 0, hlen = 0;
    const uint8_t *p = st->hbuf, *end = st->hbuf + st->hlen;
    while (p < end) {
        const uint8_t *name = p;
        size_t nl = strlen((const char *)name);
        const uint8_t *value = name + nl + 1;
        size_t vl = strlen((const char *)value);
        p = value + vl + 1;
        if (nl == 5 && !memcmp(name, ":path", 5)) {
            if (memchr(value, '#', vl))
                return -1;
        } else if (nl == 10 && !memcmp(name, ":authority", 10)) {
            auth = value;
            alen = vl;
        } else if (nl == 4 && !memcmp(name, "host", 4)) {
            host = value;
            hlen = vl;
        } else if (nl == 7 && !memcmp(name, ":method", 7) && vl == 7 &&
                   !memcmp(value, "CONNECT", 7)) {
            st->flags |= S_CONNECT;
        }
    }
    if (auth && host && (alen != hlen || !ascii_caseeq(auth, host, alen)))
        return -1;
    return 0;
}

static int h_end_headers(nghttp3_conn *h3, int64_t sid, int fin, void *cud, void *sud)
{
    h3conn *c = cud;
    stream *st = sud;
    if (!st || (st->flags & S_DISCARD))
        return 0;
    /* A field nghttp3 dropped: fewer passed up than the frame carried. */
    if ((st->flags & S_SCANNED) && st->nfields != st->scan.lines) {
        malformed(c, st);
        return 0;
    }
    if (st->flags & S_TOO_LARGE) {
        /* Answered here; Python never sees it. */
        static const nghttp3_nv nv[] = {
            {(uint8_t *)":status", (uint8_t *)"431", 7, 3, NGHTTP3_NV_FLAG_NONE},
            {(uint8_t *)"content-length", (uint8_t *)"0", 14, 1, NGHTTP3_NV_FLAG_NONE},
        };
        st->flags |= S_DISCARD | S_RESPONDED | S_FIN;
        int rv = nghttp3_conn_submit_response(h3, sid, nv, 2, NULL);
        if (rv != 0)
            return rv == NGHTTP3_ERR_NOMEM ? oom(c) : 0;
        if (!fin)
            fpy3_engine_shutdown_stream(c->qc, sid, FPY3_H3_NO_ERROR, FPY3_SHUT_RD);
        fpy3_engine_mark(c->qc);
        return 0;
    }
    if (head_check(st) < 0) {
        malformed(c, st);
        return 0;
    }
    if (fin)
        st->flags |= S_BODY_DONE;
    if (ev_promise(c->s, st) < 0)
        return oom(c);
    fpy3_h3_event *ev = ev_push(c->s, FPY3_H3_REQUEST, c, sid); /* room: promised */
    st->flags |= S_SURFACED;
    ev->data = st->hbuf;
    ev->len = st->hlen;
    ev->peer = c->peer;
    ev->peer_port = c->peer_port;
    ev->local = c->local;
    ev->local_port = c->local_port;
    ev->early = fpy3_engine_conn_early(c->qc);
    return 0;
}

static int h_recv_data(nghttp3_conn *h3, int64_t sid, const uint8_t *data, size_t len, void *cud,
                       void *sud)
{
    h3conn *c = cud;
    stream *st = sud;
    (void)h3;
    if (!st || !(st->flags & S_SURFACED)) {
        fpy3_engine_extend(c->qc, sid, len); /* nobody will consume it */
        return 0;
    }
    if (emit_data(c->s, c, st, data, len) < 0)
        return oom(c);
    st->unconsumed += len;
    c->s->unread += len;
    st->rx_ts = c->s->now;
    return 0;
}

static int h_deferred_consume(nghttp3_conn *h3, int64_t sid, size_t n, void *cud, void *sud)
{
    h3conn *c = cud;
    (void)h3;
    (void)sud;
    fpy3_engine_extend(c->qc, sid, n);
    return 0;
}

static int h_end_stream(nghttp3_conn *h3, int64_t sid, void *cud, void *sud)
{
    h3conn *c = cud;
    stream *st = sud;
    (void)h3;
    if (st)
        st->flags |= S_BODY_DONE;
    if (st && (st->flags & S_SURFACED) && !ev_push(c->s, FPY3_H3_END, c, sid))
        return oom(c);
    return 0;
}

static int h_acked(nghttp3_conn *h3, int64_t sid, uint64_t n, void *cud, void *sud)
{
    h3conn *c = cud;
    stream *st = sud;
    (void)h3;
    if (!st)
        return 0;
    chain_ack(c->s, st, n);
    st->tx_ts = c->s->now;
    if ((st->flags & S_WANT_WRITABLE) && st->buffered <= c->s->low_water) {
        if (!ev_push(c->s, FPY3_H3_WRITABLE, c, sid))
            return oom(c);
        st->flags &= ~S_WANT_WRITABLE;
    }
    return 0;
}

static int h_stream_close(nghttp3_conn *h3, int64_t sid, uint64_t code, void *cud, void *sud)
{
    h3conn *c = cud;
    stream *st = sud ? sud : smap_find(&c->streams, sid); /* or its head never began */
    (void)h3;
    if (st)
        stream_release(c, st, code);
    if ((sid & 0x3) == 0) /* client bidi: let the peer open another */
        fpy3_engine_extend_streams_bidi(c->qc, 1);
    return 0;
}

/* nghttp3 asks us to send STOP_SENDING / RESET_STREAM (e.g. a malformed request). */
static int h_stop_sending(nghttp3_conn *h3, int64_t sid, uint64_t code, void *cud, void *sud)
{
    h3conn *c = cud;
    stream *st = sud;
    (void)h3;
    if (st && !(st->flags & S_SURFACED))
        st->flags |= S_DISCARD;
    fpy3_engine_shutdown_stream(c->qc, sid, code, FPY3_SHUT_RD);
    return 0;
}

static int h_reset_stream(nghttp3_conn *h3, int64_t sid, uint64_t code, void *cud, void *sud)
{
    h3conn *c = cud;
    stream *st = sud;
    (void)h3;
    if (st) {
        if (!(st->flags & S_SURFACED))
            st->flags |= S_DISCARD;
        st->flags |= S_WR_SHUT;
    }
    fpy3_engine_shutdown_stream(c->qc, sid, code, FPY3_SHUT_WR);
    return 0;
}

static int h_shutdown(nghttp3_conn *h3, int64_t id, void *cud)
{
    h3conn *c = cud;
    (void)h3;
    (void)id;
    c->peer_goaway = 1; /* the client is going away; its open streams finish normally */
    return 0;
}

static const nghttp3_callbacks h3_callbacks = {
    .acked_stream_data = h_acked,
    .stream_close = h_stream_close,
    .recv_data = h_recv_data,
    .deferred_consume = h_deferred_consume,
    .begin_headers = h_begin_headers,
    .recv_header = h_recv_header,
    .end_headers = h_end_headers,
    .stop_sending = h_stop_sending,
    .end_stream = h_end_stream,
    .reset_stream = h_reset_stream,
    .shutdown = h_shutdown,
};

/* --- engine callbacks --------------------------------------------------------------- */

static void addr_text(const struct sockaddr *sa, char *out, size_t outlen, int *port)
{
    out[0] = 0;
    *port = 0;
    if (!sa)
        return;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &sin->sin_addr, out, (socklen_t)outlen);
        *port = ntohs(sin->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) /* show IPv4 peers as IPv4 */
            inet_ntop(AF_INET, &sin6->sin6_addr.s6_addr[12], out, (socklen_t)outlen);
        else
            inet_ntop(AF_INET6, &sin6->sin6_addr, out, (socklen_t)outlen);
        *port = ntohs(sin6->sin6_port);
    }
}

static void *e_conn_open(void *app, fpy3_qconn *qc)
{
    fpy3_h3_server *s = app;
    h3conn *c = calloc(1, sizeof(*c)); /* see struct h3conn for its owner */
    if (!c)
        return NULL; /* the engine refuses the connection */
    c->s = s;
    c->qc = qc;
    c->handle = fpy3_engine_conn_handle(qc);
    c->win.size = s->init_window;
    uint32_t len;
    addr_text(fpy3_engine_conn_peer(qc, &len), c->peer, sizeof(c->peer), &c->peer_port);
    addr_text(fpy3_engine_conn_local(qc, &len), c->local, sizeof(c->local), &c->local_port);

    nghttp3_settings settings;
    nghttp3_settings_default(&settings);
    settings.max_field_section_size = s->max_header_size;
    settings.enable_connect_protocol = s->connect_protocol;
    settings.qpack_max_dtable_capacity = 4096;
    settings.qpack_blocked_streams = 100;
    if (nghttp3_conn_server_new(&c->h3, &h3_callbacks, &settings, nghttp3_mem_default(), c) != 0) {
        free(c);
        return NULL;
    }
    nghttp3_conn_set_max_client_streams_bidi(c->h3, fpy3_engine_max_streams_bidi(qc));
    nghttp3_conn_set_max_concurrent_streams(c->h3, (size_t)s->max_streams_bidi);
    int64_t ctrl, qenc, qdec;
    if (fpy3_engine_open_uni(qc, &ctrl) < 0 || fpy3_engine_open_uni(qc, &qenc) < 0 ||
        fpy3_engine_open_uni(qc, &qdec) < 0 || nghttp3_conn_bind_control_stream(c->h3, ctrl) != 0 ||
        nghttp3_conn_bind_qpack_streams(c->h3, qenc, qdec) != 0) {
        nghttp3_conn_del(c->h3);
        free(c);
        return NULL;
    }
    if (s->shutting_down)
        send_goaway(c, s->shutting_down);
    s->stats.handshakes++;
    idle_push(c); /* no request yet */
    return c;
}

static void e_conn_close(void *ac)
{
    h3conn *c = ac;
    fpy3_h3_server *s = c->s;
    fpy3_conn_stats cs;
    fpy3_engine_conn_stats(c->qc, &cs); /* while the connection is there to ask */
    c->qc = NULL; /* first: releasing its streams must not put it on the idle list */
    idle_del(c);
    evicted_del(c);
    while (c->live)
        stream_release(c, c->live, FPY3_H3_REQUEST_CANCELLED);
    s->stats.lost_packets += cs.lost_packets;
    if (cs.smoothed_rtt_ns) {
        uint64_t us = cs.smoothed_rtt_ns / 1000;
        size_t i = 0;
        while (i < 10 && us > fpy3_h3_rtt_bounds_us[i])
            i++;
        s->stats.rtt_buckets[i]++;
        s->stats.rtt_count++;
        s->stats.rtt_sum_us += us;
    }
    c->qc = NULL;
    nghttp3_conn_del(c->h3);
    c->h3 = NULL;
    if (c->close_pending) {
        /* Unlink from the pending list; it is short. */
        for (h3conn **p = &s->pending_close; *p; p = &(*p)->next)
            if (*p == c) {
                *p = c->next;
                break;
            }
    }
    c->next = s->zombie_conns; /* REQUEST events may still point at c->peer */
    s->zombie_conns = c;
}

static int fail(h3conn *c, long rv)
{
    fpy3_engine_conn_error(c->qc, nghttp3_err_infer_quic_app_error_code((int)rv));
    return -1;
}

static int e_recv(void *ac, int64_t sid, const uint8_t *data, size_t len, int fin)
{
    h3conn *c = ac;
    if ((sid & 0x3) == 0) { /* a request stream: count its head's lines before nghttp3 */
        stream *st = smap_find(&c->streams, sid);
        if (!st && !(st = stream_open(c, sid))) {
            fpy3_engine_conn_error(c->qc, FPY3_H3_INTERNAL_ERROR);
            return -1;
        }
        if (!(st->flags & S_SCANNED) && st->scan.state != FS_BAD) {
            fscan_feed(&st->scan, data, len);
            if (st->scan.state == FS_DONE)
                st->flags |= S_SCANNED;
        }
    }
    nghttp3_ssize n = nghttp3_conn_read_stream(c->h3, sid, data, len, fin);
    if (n < 0)
        return fail(c, n);
    fpy3_engine_extend(c->qc, sid, (uint64_t)n); /* framing; body credit waits for consume() */
    return 0;
}

static int e_acked(void *ac, int64_t sid, uint64_t n)
{
    h3conn *c = ac;
    int rv = nghttp3_conn_add_ack_offset(c->h3, sid, n);
    return rv ? fail(c, rv) : 0;
}

static int e_stream_close(void *ac, int64_t sid, uint64_t code)
{
    h3conn *c = ac;
    int rv = nghttp3_conn_close_stream(c->h3, sid, code ? code : NGHTTP3_H3_NO_ERROR);
    if (rv == NGHTTP3_ERR_STREAM_NOT_FOUND) {
        if ((sid & 0x3) == 0) { /* a request stream nghttp3 never saw */
            stream *st = smap_find(&c->streams, sid);
            if (st)
                stream_release(c, st, code);
            fpy3_engine_extend_streams_bidi(c->qc, 1);
        }
        return 0;
    }
    return rv ? fail(c, rv) : 0;
}

static int e_peer_reset(void *ac, int64_t sid, uint64_t code)
{
    h3conn *c = ac;
    int rv = nghttp3_conn_shutdown_stream_read(c->h3, sid);
    if (rv)
        return fail(c, rv);
    stream *st = smap_find(&c->streams, sid);
    if (st)
        st->flags |= S_BODY_DONE; /* no more request bytes will come */
    if (st && (st->flags & S_SURFACED) && !(st->flags & S_RESET_DONE)) {
        st->flags |= S_RESET_DONE;
        fpy3_h3_event *ev = ev_push_final(c->s, FPY3_H3_RESET, c, st);
        if (ev)
            ev->code = code;
    }
    return 0;
}

static int e_stop_reading(void *ac, int64_t sid)
{
    h3conn *c = ac;
    int rv = nghttp3_conn_shutdown_stream_read(c->h3, sid);
    return rv ? fail(c, rv) : 0;
}

static int e_unblocked(void *ac, int64_t sid)
{
    h3conn *c = ac;
    int rv = nghttp3_conn_unblock_stream(c->h3, sid);
    return rv ? fail(c, rv) : 0;
}

static void e_max_streams(void *ac, uint64_t n)
{
    h3conn *c = ac;
    nghttp3_conn_set_max_client_streams_bidi(c->h3, n);
}

static long e_pull(void *ac, int64_t *sid, int *fin, fpy3_vec *vec, size_t veccnt)
{
    h3conn *c = ac;
    nghttp3_ssize n = nghttp3_conn_writev_stream(c->h3, sid, fin, (nghttp3_vec *)vec, veccnt);
    if (n < 0)
        return fail(c, n);
    return (long)n;
}

static int e_written(void *ac, int64_t sid, size_t n)
{
    h3conn *c = ac;
    if (sid < 0)
        return 0;
    int rv = nghttp3_conn_add_write_offset(c->h3, sid, n);
    return rv ? fail(c, rv) : 0;
}

static void e_blocked(void *ac, int64_t sid)
{
    h3conn *c = ac;
    nghttp3_conn_block_stream(c->h3, sid);
}

/* The write side is gone: the peer sent STOP_SENDING (the engine reset the stream). */
static void e_shut_wr(void *ac, int64_t sid)
{
    h3conn *c = ac;
    nghttp3_conn_shutdown_stream_write(c->h3, sid);
    stream *st = smap_find(&c->streams, sid);
    if (!st)
        return;
    st->flags |= S_WR_SHUT;
    if ((st->flags & S_SURFACED) && !(st->flags & S_RESET_DONE)) {
        st->flags |= S_RESET_DONE;
        fpy3_h3_event *ev = ev_push_final(c->s, FPY3_H3_RESET, c, st);
        if (ev)
            ev->code = FPY3_H3_REQUEST_CANCELLED;
    }
}

static const fpy3_engine_app engine_app = {
    .conn_open = e_conn_open,
    .conn_close = e_conn_close,
    .recv = e_recv,
    .acked = e_acked,
    .stream_close = e_stream_close,
    .peer_reset = e_peer_reset,
    .stop_reading = e_stop_reading,
    .unblocked = e_unblocked,
    .max_streams = e_max_streams,
    .pull = e_pull,
    .written = e_written,
    .blocked = e_blocked,
    .shut_wr = e_shut_wr,
};

/* --- flow control ------------------------------------------------------------------ */

/* n body bytes consumed under window w: returns how much the window grows on top of
 * the credit (auto-tuning, as ngtcp2 and browsers do). An update goes out once a
 * quarter of the window is credited; if the last one was less than two round trips
 * ago, the app reads as fast as the window lets the peer send, so the window doubles,
 * up to max, unless the worker's unread bodies are past their budget. */
static uint64_t rwin_credit(fpy3_h3_server *s, h3conn *c, rwin *w, uint64_t n, uint64_t max,
                            uint64_t now)
{
    w->credit += n;
    if (w->credit * 4 < w->size)
        return 0;
    uint64_t grow = 0;
    if (w->size < max && w->ts && s->unread <= s->unread_budget) {
        uint64_t rtt = fpy3_engine_rtt_ns(c->qc); /* 0: the engine tunes its own windows */
        if (rtt && now - w->ts < 2 * rtt) {
            uint64_t size = w->size * 2 < max ? w->size * 2 : max;
            grow = size - w->size;
            w->size = size;
        }
    }
    w->ts = now;
    w->credit = 0;
    return grow;
}

/* --- public API -------------------------------------------------------------------- */

fpy3_h3_server *fpy3_h3_server_new(int fd, const fpy3_h3_config *cfg, char *err, size_t errlen)
{
    fpy3_h3_server *s = calloc(1, sizeof(*s)); /* Python's, until fpy3_h3_server_free */
    if (!s) {
        if (err && errlen)
            snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->max_header_size = cfg->max_header_size ? cfg->max_header_size : 65536;
    s->max_header_count = cfg->max_header_count ? cfg->max_header_count : 100;
    s->connect_protocol = cfg->enable_connect_protocol != 0;
    s->max_streams_bidi = cfg->max_streams_bidi ? cfg->max_streams_bidi : 100;
    s->high_water = cfg->send_high_water ? cfg->send_high_water : 256 * 1024;
    s->low_water = s->high_water / 4;
    s->init_window = cfg->initial_max_data ? cfg->initial_max_data : 1024 * 1024;
    s->init_stream_window =
        cfg->initial_max_stream_data ? cfg->initial_max_stream_data : 256 * 1024;
    s->max_window = cfg->max_window > s->init_window ? cfg->max_window : s->init_window;
    s->max_stream_window = cfg->max_stream_window > s->init_stream_window
                               ? cfg->max_stream_window
                               : s->init_stream_window;
    s->unread_budget = cfg->unread_budget ? cfg->unread_budget : 64u * 1024 * 1024;
    s->body_timeout = cfg->body_timeout_ms * 1000000u;
    s->send_timeout = cfg->send_timeout_ms * 1000000u;
    /* Deadlines hold to a quarter of the shorter one (at most a second late). */
    uint64_t shortest = s->body_timeout && (!s->send_timeout || s->body_timeout < s->send_timeout)
                            ? s->body_timeout
                            : s->send_timeout;
    s->sweep_every = shortest / 4 < 1000000000u ? shortest / 4 : 1000000000u;
    if (s->sweep_every < 50000000u)
        s->sweep_every = 50000000u;
    s->now = mono_ns();
    s->max_idle = cfg->max_idle_connections;

    fpy3_engine_config ec = {
        .engine = cfg->engine,
        .listen_host = cfg->listen_host,
        .listen_port = (uint16_t)cfg->listen_port,
        .cert_file = cfg->cert_file,
        .key_file = cfg->key_file,
        .alpn = "h3",
        .qlog_dir = cfg->qlog_dir,
        .worker_id = cfg->worker_id,
        .retry = cfg->retry,
        .max_handshakes = cfg->max_handshakes,
        .handshake_memory = cfg->handshake_memory,
        .handshake_timeout_ms = cfg->handshake_timeout_ms ? cfg->handshake_timeout_ms : 10000,
        .max_connections = cfg->max_connections,
        .idle_timeout_ms = cfg->idle_timeout_ms ? cfg->idle_timeout_ms : 30000,
        .max_streams_bidi = s->max_streams_bidi,
        .max_streams_uni = 3,
        .initial_max_data = s->init_window,
        .max_window = s->max_window,
        .initial_max_stream_data = s->init_stream_window,
        .max_udp_payload = cfg->max_udp_payload,
        .key_password = cfg->key_password,
        .client_ca = cfg->client_ca,
        .client_auth = cfg->client_auth,
        .session_tickets = cfg->session_tickets,
        .ticket_lifetime = cfg->ticket_lifetime,
        .early_data = cfg->early_data,
        .close_wait_ms = cfg->close_wait_ms ? cfg->close_wait_ms : 3000,
    };
    memcpy(ec.static_secret, cfg->static_secret, sizeof(ec.static_secret));
    memcpy(ec.ticket_key, cfg->ticket_key, sizeof(ec.ticket_key));
    s->e = fpy3_engine_new(fd, &ec, &engine_app, s, err, errlen);
    if (!s->e) {
        free(s);
        return NULL;
    }
    return s;
}

void fpy3_h3_server_free(fpy3_h3_server *s)
{
    if (!s)
        return;
    /* Clients learn at once (CONNECTION_CLOSE), not at their idle timeout. */
    fpy3_h3_close_all(s, FPY3_H3_NO_ERROR);
    fpy3_engine_free(s->e); /* conn_close for each: streams and conns become zombies */
    s->e = NULL;
    batch_begin(s);
    while (s->arena) {
        ablock *b = s->arena;
        s->arena = b->next;
        free(b);
    }
    while (s->free_streams) {
        stream *st = s->free_streams;
        s->free_streams = st->next;
        free(st->hbuf);
        free(st);
    }
    while (s->free_chunks) {
        chunk *ch = s->free_chunks;
        s->free_chunks = ch->next;
        free(ch);
    }
    free(s->ev);
    free(s->pend);
    free(s->nv);
    free(s);
}

static void drain_check(void *ac, void *arg)
{
    h3conn *c = ac;
    (void)arg;
    if (c->qc && c->h3 && nghttp3_conn_is_drained(c->h3))
        conn_close_later(c, FPY3_H3_NO_ERROR);
}

/* Closes connections queued by conn_close_later (and drained ones when shutting down). */
static void close_pending(fpy3_h3_server *s)
{
    if (s->shutting_down == 2)
        fpy3_engine_each(s->e, drain_check, NULL);
    while (s->pending_close) {
        h3conn *c = s->pending_close;
        s->pending_close = c->next;
        c->close_pending = 0;
        if (c->qc)
            fpy3_engine_conn_close(c->qc, c->close_code);
    }
}

int fpy3_h3_fd(fpy3_h3_server *s) { return fpy3_engine_fd(s->e); }

int fpy3_h3_read(fpy3_h3_server *s)
{
    batch_begin(s);
    evicted_close(s);
    fpy3_engine_read(s->e);
    if (s->pending_close || s->shutting_down) {
        close_pending(s);
        fpy3_engine_flush(s->e);
    }
    return (int)s->nev;
}

/* A stream past a deadline: reset with H3_REQUEST_CANCELLED, as Python's own reset
 * does, and Python (if it knows the stream) gets a RESET event. */
static void stream_expired(h3conn *c, stream *st)
{
    fpy3_h3_server *s = c->s;
    if ((st->flags & S_SURFACED) && !(st->flags & S_RESET_DONE)) {
        fpy3_h3_event *ev = ev_push_final(s, FPY3_H3_RESET, c, st);
        if (ev)
            ev->code = FPY3_H3_REQUEST_CANCELLED;
    }
    st->flags |= S_RESET_DONE | S_WR_SHUT | S_BODY_DONE;
    if (nghttp3_conn_shutdown_stream_read(c->h3, st->id) != 0)
        conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
    nghttp3_conn_shutdown_stream_write(c->h3, st->id);
    fpy3_engine_shutdown_stream(c->qc, st->id, FPY3_H3_REQUEST_CANCELLED,
                                FPY3_SHUT_RD | FPY3_SHUT_WR);
}

/* The deadlines of one connection's streams (the connection itself may be busy: a
 * PING keeps it alive, not its streams). */
static void sweep_conn(void *ac, void *arg)
{
    h3conn *c = ac;
    fpy3_h3_server *s = arg;
    if (!c->qc || !c->h3)
        return;
    for (stream *st = c->live; st; st = st->next) {
        if (st->flags & (S_RESET_DONE | S_WR_SHUT))
            continue; /* ending already */
        /* The client does not take the response: bytes wait, none acknowledged. */
        if (s->send_timeout && st->buffered && s->now - st->tx_ts > s->send_timeout) {
            s->send_timeouts++;
            stream_expired(c, st);
            continue;
        }
        /* The client does not send the request (head or body) while nothing of it
         * waits for the app, so its windows are open. A websocket's body never ends. */
        if (s->body_timeout && !(st->flags & (S_BODY_DONE | S_CONNECT)) && !st->unconsumed &&
            s->now - st->rx_ts > s->body_timeout) {
            s->body_timeouts++;
            stream_expired(c, st);
        }
    }
}

static int sweep_due(const fpy3_h3_server *s)
{
    return s->nlive && (s->body_timeout || s->send_timeout);
}

int fpy3_h3_expire(fpy3_h3_server *s)
{
    batch_begin(s);
    evicted_close(s);
    fpy3_engine_expire(s->e);
    if (sweep_due(s) && s->now >= s->next_sweep) {
        fpy3_engine_each(s->e, sweep_conn, s);
        s->next_sweep = s->now + s->sweep_every;
        fpy3_engine_flush(s->e);
    }
    if (s->pending_close || s->shutting_down) {
        close_pending(s);
        fpy3_engine_flush(s->e);
    }
    return (int)s->nev;
}

int fpy3_h3_flush(fpy3_h3_server *s)
{
    s->in_flush = 1;
    close_pending(s);
    int rv = fpy3_engine_flush(s->e);
    s->in_flush = 0;
    return rv;
}

int64_t fpy3_h3_next_timeout_ms(fpy3_h3_server *s)
{
    if (s->pending_close || s->npend || s->evicted)
        return 0; /* expire() delivers them, or closes the evicted */
    int64_t ms = fpy3_engine_next_timeout_ms(s->e);
    if (sweep_due(s)) {
        uint64_t now = mono_ns();
        int64_t sweep =
            s->next_sweep <= now ? 0 : (int64_t)((s->next_sweep - now + 999999) / 1000000);
        if (ms < 0 || sweep < ms)
            ms = sweep;
    }
    return ms;
}

const fpy3_h3_event *fpy3_h3_events(fpy3_h3_server *s, size_t *count)
{
    *count = s->nev;
    return s->ev;
}

int fpy3_h3_respond(fpy3_h3_server *s, uint64_t conn, int64_t sid, int status,
                    const char *headers, size_t len, int end_stream)
{
    h3conn *c;
    stream *st = stream_of(s, conn, sid, &c);
    if (!st || (st->flags & (S_RESPONDED | S_WR_SHUT)) || status < 100 || status > 999)
        return -1;
    char code[4] = {(char)('0' + status / 100), (char)('0' + status / 10 % 10),
                    (char)('0' + status % 10), 0};
    if (submit_fields(s, c, sid, code, headers, len, end_stream ? NULL : &body_reader) != 0)
        return -1;
    st->flags |= S_RESPONDED | (end_stream ? S_FIN : 0);
    fpy3_engine_mark(c->qc);
    return 0;
}

/* Fields "name\0value\0..." (after :status when given) as one HEADERS frame: a
 * response with ``body`` (NULL = none), or trailers when status is NULL. nghttp3 copies
 * the fields. 0, or -1 (the connection closes on a fatal error). */
static int submit_fields(fpy3_h3_server *s, h3conn *c, int64_t sid, const char *status,
                         const char *fields, size_t len, const nghttp3_data_reader *body)
{
    size_t nfields = 0;
    for (size_t i = 0; i < len; i++)
        nfields += fields[i] == 0;
    if (nfields & 1)
        return -1; /* names and values must pair up */
    nfields /= 2;
    size_t total = nfields + (status != NULL);
    nghttp3_nv stack_nv[NV_STACK], *nv = stack_nv;
    if (total > NV_STACK) {
        if (s->nvcap < total) {
            nghttp3_nv *n = realloc(s->nv, total * sizeof(*n)); /* replaces s->nv */
            if (!n) {
                conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
                return -1;
            }
            s->nv = n;
            s->nvcap = total;
        }
        nv = s->nv;
    }
    size_t i = 0;
    if (status)
        nv[i++] = (nghttp3_nv){(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP3_NV_FLAG_NONE};
    const char *p = fields;
    for (; i < total; i++) {
        size_t nl = strlen(p);
        const char *v = p + nl + 1;
        size_t vl = strlen(v);
        nv[i] = (nghttp3_nv){(uint8_t *)p, (uint8_t *)v, nl, vl, NGHTTP3_NV_FLAG_NONE};
        p = v + vl + 1;
    }
    int rv = status ? nghttp3_conn_submit_response(c->h3, sid, nv, total, body)
                    : nghttp3_conn_submit_trailers(c->h3, sid, nv, total);
    if (rv != 0) {
        if (nghttp3_err_is_fatal(rv))
            conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
        return -1;
    }
    return 0;
}

int fpy3_h3_trailers(fpy3_h3_server *s, uint64_t conn, int64_t sid, const char *headers,
                     size_t len)
{
    h3conn *c;
    stream *st = stream_of(s, conn, sid, &c);
    if (!st || !(st->flags & S_RESPONDED) || (st->flags & (S_FIN | S_WR_SHUT)))
        return -1;
    uint8_t *copy = malloc(len ? len : 1); /* the stream's: see stream.trailers */
    if (!copy) {
        conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
        return -1;
    }
    memcpy(copy, headers, len);
    free(st->trailers);
    st->trailers = copy;
    st->tlen = len;
    return fpy3_h3_send(s, conn, sid, NULL, 0, 1) < 0 ? -1 : 0;
}

int64_t fpy3_h3_send(fpy3_h3_server *s, uint64_t conn, int64_t sid, const uint8_t *data,
                     size_t len, int fin)
{
    h3conn *c;
    stream *st = stream_of(s, conn, sid, &c);
    if (!st || !(st->flags & S_RESPONDED) || (st->flags & (S_FIN | S_WR_SHUT)))
        return -1;
    if (!st->buffered && len)
        st->tx_ts = mono_ns(); /* the response's deadline starts with bytes to send */
    if (len && chain_append(s, st, data, len) < 0) {
        conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
        return -1;
    }
    if (fin)
        st->flags |= S_FIN;
    if (nghttp3_conn_resume_stream(c->h3, sid) != 0) {
        conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
        return -1;
    }
    fpy3_engine_mark(c->qc);
    if (st->buffered > s->high_water && !fin)
        st->flags |= S_WANT_WRITABLE;
    return (int64_t)st->buffered;
}

int fpy3_h3_consume(fpy3_h3_server *s, uint64_t conn, int64_t sid, size_t n)
{
    h3conn *c;
    stream *st = stream_of(s, conn, sid, &c);
    if (!st)
        return -1;
    if (n > st->unconsumed)
        n = (size_t)st->unconsumed;
    if (!n)
        return 0;
    st->unconsumed -= n;
    s->unread -= n;
    uint64_t now = mono_ns();
    st->rx_ts = now; /* the window opens: the request's deadline starts again */
    fpy3_engine_extend(c->qc, sid, n);
    uint64_t grow = rwin_credit(s, c, &st->win, n, s->max_stream_window, now);
    if (grow)
        fpy3_engine_grow(c->qc, sid, grow);
    grow = rwin_credit(s, c, &c->win, n, s->max_window, now);
    if (grow)
        fpy3_engine_grow(c->qc, -1, grow);
    fpy3_engine_mark(c->qc);
    return 0;
}

void fpy3_h3_guard_get(fpy3_h3_server *s, fpy3_h3_guard *out)
{
    fpy3_engine_stats es;
    fpy3_engine_stats_get(s->e, &es);
    memset(out, 0, sizeof(*out));
    out->connections = es.connections;
    out->handshakes = es.handshakes;
    out->handshake_bytes = es.handshake_bytes;
    out->quic_bytes = es.quic_bytes;
    out->retries = es.retries;
    out->refused = es.refused;
    out->pressure = es.pressure;
    out->unread = s->unread;
    out->body_timeouts = s->body_timeouts;
    out->send_timeouts = s->send_timeouts;
    out->malformed = s->malformed;
    out->idle_closed = s->idle_closed;
}

int fpy3_h3_reset(fpy3_h3_server *s, uint64_t conn, int64_t sid, uint64_t h3_error)
{
    h3conn *c;
    stream *st = stream_of(s, conn, sid, &c);
    if (!st)
        return -1;
    st->flags |= S_RESET_DONE | S_WR_SHUT;
    if (nghttp3_conn_shutdown_stream_read(c->h3, sid) != 0)
        conn_close_later(c, FPY3_H3_INTERNAL_ERROR);
    nghttp3_conn_shutdown_stream_write(c->h3, sid);
    fpy3_engine_shutdown_stream(c->qc, sid, h3_error, FPY3_SHUT_RD | FPY3_SHUT_WR);
    return 0;
}

int fpy3_h3_want_write(fpy3_h3_server *s) { return fpy3_engine_want_write(s->e); }

static void goaway_each(void *ac, void *arg)
{
    h3conn *c = ac;
    if (c->qc && c->h3)
        send_goaway(c, *(int *)arg);
}

void fpy3_h3_shutdown(fpy3_h3_server *s, int phase)
{
    if (phase <= s->shutting_down || phase > 2)
        return;
    if (!s->shutting_down)
        fpy3_engine_stop_accepting(s->e);
    s->shutting_down = phase;
    fpy3_engine_each(s->e, goaway_each, &phase);
}

size_t fpy3_h3_connection_count(fpy3_h3_server *s) { return fpy3_engine_conn_count(s->e); }

void fpy3_h3_get_stats(fpy3_h3_server *s, fpy3_h3_stats *out) { *out = s->stats; }

void fpy3_h3_close_all(fpy3_h3_server *s, uint64_t h3_error)
{
    /* As in a flush: the events this raises (streams reset and closed) lead the next
     * batch, and next_timeout_ms is 0 until then. */
    s->in_flush = 1;
    close_pending(s); /* those already failing close with their own code */
    fpy3_engine_close_all(s->e, h3_error);
    s->in_flush = 0;
}

int fpy3_h3_conn_tls(fpy3_h3_server *s, uint64_t conn, fpy3_h3_tls_info *out)
{
    h3conn *c = conn_of(s, conn);
    fpy3_tls_info info;
    if (!c || !c->qc || fpy3_engine_conn_tls(c->qc, &info) < 0)
        return -1;
    out->tls_version = info.tls_version;
    out->cipher_suite = info.cipher_suite;
    out->certs = info.certs;
    out->certs_len = info.certs_len;
    out->cert_name = info.cert_name;
    return 0;
}

int fpy3_h3_reload_credentials(fpy3_h3_server *s, const char *cert_file, const char *key_file,
                               const char *key_password, char *err, size_t errlen)
{
    return fpy3_engine_reload_credentials(s->e, cert_file, key_file, key_password, err, errlen);
}
