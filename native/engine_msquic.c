/* engine_msquic: the QUIC server engine (engine.h) on MsQuic, loaded at run time.
 *
 * MsQuic runs on the loop thread, with no thread of its own: it is set up for
 * application-driven execution (ExecutionCreate, MsQuic >= 2.6). Its sockets and
 * wake-ups sit in one epoll set, which is the fd the loop watches; `pump` runs the
 * work that is due (ExecutionPoll, then each ready entry's completion) until none is
 * left, and leaves the time to MsQuic's next timer for fpy3_engine_next_timeout_ms.
 * So datagrams are read, decrypted, answered and sent from the loop, in batches, as
 * engine_ngtcp2 does, and no event crosses a thread.
 *
 * Events: MsQuic's callbacks never call the app. They run inside `pump` and queue the
 * event; fpy3_engine_read (and expire) hand the queue to the app afterwards, so the
 * app's calls back into the engine never run inside MsQuic's processing. Each event is
 * a node inside the object it is about (connection, stream, send record), there from
 * the object's creation, one per kind of event, since MsQuic reports each kind at most
 * once per object (RECEIVE once per indication, and the next comes only after
 * StreamReceiveComplete). So queueing never allocates and never fails, and no event is
 * lost.
 *
 * Receive: a RECEIVE event returns QUIC_STATUS_PENDING; its bytes are handed to
 * the app when the queue is handled (nghttp3 copies or consumes them) and
 * StreamReceiveComplete is called when the app's credit (fpy3_engine_extend) covers
 * the whole indication, so MsQuic opens the peer's window only as fast as the app
 * consumes.
 *
 * Send: flush drains the app's `pull` into StreamSend calls (send buffering off:
 * zero copy), then pumps so that MsQuic sends at once; each send record keeps its
 * buffer list until SEND_COMPLETE, which becomes `acked`.
 *
 * Handles: connections and peer streams come from MsQuic's callbacks and are freed
 * when their SHUTDOWN_COMPLETE event is handled; only then are ConnectionClose /
 * StreamClose called. Nothing holds a raw pointer across batches except the queue
 * and the stop list, and freeing an object takes it off both.
 *
 * Sockets and steering: the listener is put on partition 0 of two, which makes MsQuic
 * bind one SO_REUSEPORT socket (it sets the option only when it has more than one
 * partition) and attach no reuseport program of its own, so under fpy3-master each
 * worker adds one socket to the port's group and the master's steering program stays
 * (fpy3/supervisor/steering/msquic_group.py). The second partition only exists for
 * that; it is polled like the first.
 *
 * One engine per process drives MsQuic at a time: its executions are process-wide and
 * live as long as the process (ExecutionCreate works only before MsQuic's first use).
 * An engine that cannot close MsQuic's objects within its deadline at free time is
 * left allocated (they may still refer to it), never freed under them.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine_common.h"
#include "msquic_api.h"

#define NBUCKETS 64          /* per-connection stream id hash */
#define MAX_PULLS 4096       /* StreamSend calls per connection per flush */
#define RECV_BUFS 3          /* MsQuic indicates at most 3 buffers in our receive mode */
#define APP_INTERNAL_ERROR 0x102 /* H3_INTERNAL_ERROR: the only app on this engine is h3 */
#define APP_CRITICAL_STREAM 0x104
#define APP_NO_ERROR 0x100
#define MQ_STATUS_OUT_OF_MEMORY 12u /* ENOMEM */
#define MQ_STATUS_INTERNAL_ERROR 5u /* EIO */
#define NEXEC 2                /* partitions: see "Sockets and steering" above */
#define CQES 64                /* epoll entries taken per epoll_wait */
#define POLLS_PER_ROUND 1024   /* ExecutionPoll runs one connection's work per call */
#define PUMP_ROUNDS 16         /* epoll rounds per pump: more waits for the next loop turn */
#define CLOSE_ALL_WAIT_MS 1000 /* close_all: the longest wait for the closes */
#define SENDS_WAIT_MS 2000     /* free: at most this much of close_wait_ms for last sends */
#define MIN_VERSION_MINOR 6    /* 2.6: partitioned listeners, RegistrationClose2 */

/* --- loading ------------------------------------------------------------------------- */

static const mq_api *api;
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int load_state; /* 0 not tried, 1 loaded, -1 failed */
static char load_err[512];

static int try_open(const char *path, char *why, size_t whylen)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *d = dlerror();
        snprintf(why, whylen, "%s", d ? d : path);
        return -1;
    }
    mq_open_version_fn open = (mq_open_version_fn)dlsym(h, "MsQuicOpenVersion");
    if (!open) {
        snprintf(why, whylen, "%s: no MsQuicOpenVersion", path);
        dlclose(h);
        return -1;
    }
    const void *table = NULL;
    mq_status st = open(MQ_API_VERSION_2, &table);
    if (MQ_FAILED(st) || !table) {
        snprintf(why, whylen, "%s: MsQuicOpenVersion(2) failed (status 0x%x)", path, st);
        dlclose(h);
        return -1;
    }
    const mq_api *t = table;
    uint32_t v[4] = {0};
    uint32_t vlen = sizeof(v);
    st = t->GetParam(NULL, MQ_PARAM_GLOBAL_LIBRARY_VERSION, &vlen, v);
    if (MQ_FAILED(st) || v[0] != 2 || v[1] < MIN_VERSION_MINOR) {
        /* The table of an older release ends before the functions used here. */
        snprintf(why, whylen, "%s is MsQuic %u.%u.%u; fpy3 needs 2.%u or later", path, v[0],
                 v[1], v[2], MIN_VERSION_MINOR);
        return -1; /* opened, so left loaded: MsQuicClose would be its only undo */
    }
    api = t; /* kept for the life of the process */
    return 0;
}

int fpy3_msquic_load(char *err, size_t errlen)
{
    pthread_mutex_lock(&load_lock);
    if (load_state == 0) {
        char a[240] = "", b[240] = "";
        const char *env = getenv("FPY3_MSQUIC_LIB");
        int ok = env && env[0] && try_open(env, a, sizeof(a)) == 0;
        if (!ok)
            ok = try_open("libmsquic.so.2", b, sizeof(b)) == 0;
        load_state = ok ? 1 : -1;
        if (!ok) {
            if (a[0])
                snprintf(load_err, sizeof(load_err), "FPY3_MSQUIC_LIB: %s; %s", a, b);
            else
                snprintf(load_err, sizeof(load_err), "%s", b);
        }
    }
    int rv = load_state == 1 ? 0 : -1;
    pthread_mutex_unlock(&load_lock);
    if (rv < 0)
        fpy3_seterr(err, errlen, "%s", load_err);
    return rv;
}

/* --- state ----------------------------------------------------------------------------- */

enum {
    EV_CONNECTED,
    EV_CONN_SHUTDOWN,
    EV_CONN_DONE,
    EV_CONN_FAILED, /* a callback could not take an event: close with an error */
    EV_STREAM_STARTED,
    EV_START_COMPLETE,
    EV_RECV,
    EV_SEND_DONE,
    EV_PEER_FIN,
    EV_PEER_RESET,
    EV_PEER_STOP,
    EV_STREAM_DONE,
};

typedef struct ms_event ms_event;
struct ms_event {
    ms_event *next;
    void *obj;    /* the connection, stream or send record it is about */
    uint8_t type;
    uint8_t queued; /* on the queue now */
};

typedef struct ms_stream ms_stream;

typedef struct {
    ms_stream *st;
    uint64_t len;
    int canceled;     /* SEND_COMPLETE's */
    ms_event ev_done; /* SEND_COMPLETE */
    uint32_t n;
    mq_buffer b[]; /* MsQuic reads this list until SEND_COMPLETE */
} ms_send;

struct ms_stream {
    fpy3_qconn *qc;
    mq_handle h;
    int64_t sid;
    ms_stream *hnext;
    /* receive side */
    int rx_pending;           /* an indication awaits StreamReceiveComplete */
    uint64_t rx_base, rx_len; /* that indication */
    uint64_t rx_credit;       /* bytes the app has consumed, from offset 0 */
    int in_recv;              /* handing an indication to the app: complete it after */
    int fin_seen, discard, wr_shut, in_map;
    uint64_t code; /* the last reset / stop code seen or sent: stream_close's code */
    ms_stream *stop_next; /* on the engine's stop list: stop_reading is due */
    int stop_queued;
    /* Event payloads: written by the callback that queues the event. */
    struct {
        uint64_t offset, total;
        uint32_t flags, nbuf;
        mq_buffer *bufs; /* == inl, or malloc'd by stream_cb and freed by on_recv */
        mq_buffer inl[RECV_BUFS];
    } rx;
    uint64_t start_id;
    mq_status start_status;
    uint64_t peer_reset_code, peer_stop_code;
    ms_event ev_started, ev_start_done, ev_recv, ev_peer_fin, ev_peer_reset, ev_peer_stop,
        ev_done;
};

enum { QC_HANDSHAKE, QC_OPEN, QC_CLOSING };

struct fpy3_qconn {
    fpy3_qconn_base b; /* first: engine, app state, handle, dirty list */
    mq_handle h;
    int state, counted, err_set;
    uint64_t err;
    uint32_t sends_out;  /* StreamSend calls not yet completed */
    int close_when_sent; /* a graceful close waits for them: they carry GOAWAY */
    uint64_t close_code;
    int64_t next_uni;
    uint64_t closed_bidi;
    struct sockaddr_storage peer, local;
    uint32_t peerlen, locallen;
    ms_stream *buckets[NBUCKETS];
    int failed; /* set in a callback: the connection is being shut down */
    ms_event ev_connected, ev_shutdown, ev_done, ev_failed;
};

struct fpy3_engine {
    fpy3_engine_base b; /* first: ops, app callbacks, connection table, dirty list */
    fpy3_engine_config cfg;
    mq_handle reg, config, listener;
    mq_buffer alpn;
    uint8_t alpnbuf[256];
    int accepting;
    int listener_stopped;   /* its STOP_COMPLETE came */
    atomic_int reg_closed;  /* RegistrationClose2 finished (on MsQuic's close thread) */
    long live;              /* connections MsQuic gave us and we have not freed */
    int freeing;
    int closed_all; /* close_all ran: connections finishing their handshake close too */
    uint64_t closed_all_code;
    uint32_t mq_wait; /* ms to MsQuic's next timer, as of the last pump; UINT32_MAX none */

    ms_event *qhead, *qtail; /* queued by MsQuic's callbacks, handled by drain */
    ms_stream *stops;        /* streams whose stop_reading is due */
    size_t nactive;
};

/* --- MsQuic's executions (process-wide) --------------------------------------------- */

static int exq = -1;              /* the epoll set: MsQuic's sockets and wake-ups */
static mq_execution *exs[NEXEC];
static int ex_state;              /* 0 not made, 1 made, -1 failed (for the process's life) */
static fpy3_engine *ex_driver;    /* the engine that drives them now */
static size_t left_open;          /* engines left allocated: see ms_free */

size_t fpy3_msquic_left_open(void) { return left_open; }

/* Makes the executions, once per process, before MsQuic's first registration. */
static int executions_make(char *err, size_t errlen)
{
    if (ex_state == 1)
        return 0;
    if (ex_state < 0) {
        fpy3_seterr(err, errlen, "MsQuic execution contexts could not be made in this process");
        return -1;
    }
    ex_state = -1;
    exq = epoll_create1(EPOLL_CLOEXEC); /* kept for the life of the process */
    if (exq < 0) {
        fpy3_seterr(err, errlen, "epoll_create1: %s", strerror(errno));
        return -1;
    }
    mq_execution_config ec[NEXEC];
    for (int i = 0; i < NEXEC; i++) {
        ec[i].IdealProcessor = 0;
        ec[i].EventQ = &exq;
    }
    mq_status rv = api->ExecutionCreate(0, 0, NEXEC, ec, exs);
    if (MQ_FAILED(rv)) {
        fpy3_seterr(err, errlen,
                    "MsQuic ExecutionCreate: status 0x%x (needs an epoll build of MsQuic, "
                    "set up before any other use in the process)",
                    rv);
        return -1;
    }
    ex_state = 1;
    return 0;
}

static void ms_free(fpy3_engine *e);

static void ev_init(ms_event *ev, int type, void *obj)
{
    ev->type = (uint8_t)type;
    ev->obj = obj;
}

static void stream_init(ms_stream *st, fpy3_qconn *qc)
{
    st->qc = qc;
    st->rx.bufs = st->rx.inl;
    ev_init(&st->ev_started, EV_STREAM_STARTED, st);
    ev_init(&st->ev_start_done, EV_START_COMPLETE, st);
    ev_init(&st->ev_recv, EV_RECV, st);
    ev_init(&st->ev_peer_fin, EV_PEER_FIN, st);
    ev_init(&st->ev_peer_reset, EV_PEER_RESET, st);
    ev_init(&st->ev_peer_stop, EV_PEER_STOP, st);
    ev_init(&st->ev_done, EV_STREAM_DONE, st);
}

/* Queues ev: 0, or -1 when it is on the queue already (MsQuic reported the same
 * thing twice before drain took the first). */
static int push(fpy3_engine *e, ms_event *ev)
{
    if (ev->queued)
        return -1;
    ev->queued = 1;
    ev->next = NULL;
    if (e->qtail)
        e->qtail->next = ev;
    else
        e->qhead = ev;
    e->qtail = ev;
    return 0;
}

/* --- MsQuic callbacks (inside pump: no app calls) ------------------------------------- */

/* An event could not be taken: the connection cannot go on without it, so it is shut
 * down with an error at once (MsQuic allows it from its callbacks), and drain detaches
 * the app when it sees EV_CONN_FAILED. */
static void conn_fail_async(fpy3_qconn *qc)
{
    if (qc->failed)
        return;
    qc->failed = 1;
    api->ConnectionShutdown(qc->h, MQ_CONN_SHUTDOWN_FLAG_NONE, APP_INTERNAL_ERROR);
    push(qc->b.e, &qc->ev_failed); /* one node, queued once: cannot be on the queue */
}

/* Queues an event MsQuic reports at most once per object; finding it queued already
 * means that assumption broke, and the connection fails rather than lose it. */
static void push_once(fpy3_qconn *qc, ms_event *ev)
{
    if (push(qc->b.e, ev) < 0)
        conn_fail_async(qc);
}

static mq_status stream_cb(mq_handle h, void *ctx, mq_stream_event *mev)
{
    ms_stream *st = ctx;
    fpy3_qconn *qc = st->qc;
    (void)h;
    switch (mev->Type) {
    case MQ_STREAM_EVENT_START_COMPLETE:
        st->start_id = mev->START_COMPLETE.ID;
        st->start_status = mev->START_COMPLETE.Status;
        push_once(qc, &st->ev_start_done);
        break;
    case MQ_STREAM_EVENT_RECEIVE: {
        if (qc->failed)
            return MQ_STATUS_SUCCESS; /* the connection is closing: nobody reads on */
        uint32_t n = mev->RECEIVE.BufferCount;
        st->rx.offset = mev->RECEIVE.AbsoluteOffset;
        st->rx.total = mev->RECEIVE.TotalBufferLength;
        st->rx.flags = mev->RECEIVE.Flags;
        st->rx.nbuf = n;
        st->rx.bufs = st->rx.inl;
        /* More buffers than MsQuic gives in our mode; owned by the event, freed by
         * on_recv. */
        if (n > RECV_BUFS && !(st->rx.bufs = malloc(n * sizeof(mq_buffer)))) {
            st->rx.bufs = st->rx.inl;
            /* MsQuic would take an error status as "all consumed" and drop the
             * bytes: fail the connection instead. */
            conn_fail_async(qc);
            return MQ_STATUS_SUCCESS;
        }
        /* The buffer list lives on MsQuic's stack; the bytes stay until completed. */
        memcpy(st->rx.bufs, mev->RECEIVE.Buffers, n * sizeof(mq_buffer));
        if (push(qc->b.e, &st->ev_recv) < 0) {
            conn_fail_async(qc); /* an indication before the last was completed: never */
            return MQ_STATUS_SUCCESS;
        }
        return MQ_STATUS_PENDING;
    }
    case MQ_STREAM_EVENT_SEND_COMPLETE: {
        ms_send *rec = mev->SEND_COMPLETE.ClientContext;
        rec->canceled = mev->SEND_COMPLETE.Canceled != 0;
        push_once(qc, &rec->ev_done);
        break;
    }
    case MQ_STREAM_EVENT_PEER_SEND_SHUTDOWN:
        push_once(qc, &st->ev_peer_fin);
        break;
    case MQ_STREAM_EVENT_PEER_SEND_ABORTED:
        st->peer_reset_code = mev->PEER_SEND_ABORTED.ErrorCode;
        push_once(qc, &st->ev_peer_reset);
        break;
    case MQ_STREAM_EVENT_PEER_RECEIVE_ABORTED:
        st->peer_stop_code = mev->PEER_RECEIVE_ABORTED.ErrorCode;
        push_once(qc, &st->ev_peer_stop);
        break;
    case MQ_STREAM_EVENT_SHUTDOWN_COMPLETE:
        push_once(qc, &st->ev_done);
        break;
    default:
        break;
    }
    return MQ_STATUS_SUCCESS;
}

static mq_status conn_cb(mq_handle h, void *ctx, mq_connection_event *mev)
{
    fpy3_qconn *qc = ctx;
    fpy3_engine *e = qc->b.e;
    (void)h;
    switch (mev->Type) {
    case MQ_CONN_EVENT_CONNECTED:
        push_once(qc, &qc->ev_connected);
        break;
    case MQ_CONN_EVENT_SHUTDOWN_INITIATED_BY_TRANSPORT:
    case MQ_CONN_EVENT_SHUTDOWN_INITIATED_BY_PEER:
        push(e, &qc->ev_shutdown); /* either, once: both only stop the counting */
        break;
    case MQ_CONN_EVENT_SHUTDOWN_COMPLETE:
        push(e, &qc->ev_done); /* the last event: its node is never queued before */
        break;
    case MQ_CONN_EVENT_PEER_STREAM_STARTED: {
        mq_handle sh = mev->PEER_STREAM_STARTED.Stream;
        uint64_t id = 0;
        uint32_t len = sizeof(id);
        if (MQ_FAILED(api->GetParam(sh, MQ_PARAM_STREAM_ID, &len, &id)) || len != sizeof(id)) {
            conn_fail_async(qc); /* a stream we cannot name */
            return MQ_STATUS_INTERNAL_ERROR; /* MsQuic closes the stream itself */
        }
        /* Owned by the engine: freed at the stream's SHUTDOWN_COMPLETE, or with its
         * connection (conn_free). */
        ms_stream *st = calloc(1, sizeof(*st));
        if (!st) {
            conn_fail_async(qc);
            return MQ_STATUS_OUT_OF_MEMORY;
        }
        stream_init(st, qc);
        st->h = sh;
        st->sid = (int64_t)id;
        api->SetCallbackHandler(sh, (void *)stream_cb, st);
        push(e, &st->ev_started); /* a new node: cannot be queued */
        break;
    }
    default:
        break;
    }
    return MQ_STATUS_SUCCESS;
}

static uint32_t copy_addr(struct sockaddr_storage *dst, const mq_addr *a)
{
    if (!a)
        return 0;
    uint32_t len = a->Ip.sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                               : sizeof(struct sockaddr_in);
    memcpy(dst, a, len);
    return len;
}

static mq_status listener_cb(mq_handle l, void *ctx, mq_listener_event *lev)
{
    fpy3_engine *e = ctx;
    (void)l;
    if (lev->Type == MQ_LISTENER_EVENT_STOP_COMPLETE) {
        e->listener_stopped = 1;
        return MQ_STATUS_SUCCESS;
    }
    if (lev->Type != MQ_LISTENER_EVENT_NEW_CONNECTION)
        return MQ_STATUS_SUCCESS;
    if (!e->accepting)
        return MQ_STATUS_CONNECTION_REFUSED;
    if (e->cfg.max_connections && (uint64_t)e->live >= e->cfg.max_connections)
        return MQ_STATUS_CONNECTION_REFUSED; /* http3.max_connections */
    mq_handle ch = lev->NEW_CONNECTION.Connection;
    /* Without it ConnectionClose would wait for work that only this thread runs. */
    uint8_t one = 1;
    if (MQ_FAILED(api->SetParam(ch, MQ_PARAM_CONN_CLOSE_ASYNC, sizeof(one), &one)))
        return MQ_STATUS_INTERNAL_ERROR; /* refused: MsQuic closes it */
    /* Owned by the engine: freed at SHUTDOWN_COMPLETE (conn_free). Without memory
     * MsQuic refuses the connection. */
    fpy3_qconn *qc = calloc(1, sizeof(*qc));
    if (!qc)
        return MQ_STATUS_OUT_OF_MEMORY;
    const mq_new_connection_info *info = lev->NEW_CONNECTION.Info;
    qc->b.e = e;
    qc->h = ch;
    qc->next_uni = 3; /* server-initiated unidirectional: 3, 7, 11, ... */
    qc->peerlen = copy_addr(&qc->peer, info->RemoteAddress);
    qc->locallen = copy_addr(&qc->local, info->LocalAddress);
    ev_init(&qc->ev_connected, EV_CONNECTED, qc);
    ev_init(&qc->ev_shutdown, EV_CONN_SHUTDOWN, qc);
    ev_init(&qc->ev_done, EV_CONN_DONE, qc);
    ev_init(&qc->ev_failed, EV_CONN_FAILED, qc);
    api->SetCallbackHandler(ch, (void *)conn_cb, qc);
    mq_status rv = api->ConnectionSetConfiguration(ch, e->config);
    if (MQ_FAILED(rv)) {
        /* Refused: MsQuic keeps the handle and reports nothing more about it. */
        api->SetCallbackHandler(ch, NULL, NULL);
        free(qc);
        return rv;
    }
    e->live++;
    return MQ_STATUS_SUCCESS;
}

/* --- running MsQuic ------------------------------------------------------------------ */

/* Runs MsQuic's work that is due: the operations the app queued (sends, receive
 * completions, closes), timers, and the datagrams waiting on its socket, until none is
 * left or PUMP_ROUNDS epoll rounds are done (then e->mq_wait is 0: more at once). */
static void pump(fpy3_engine *e)
{
    for (int round = 0; round < PUMP_ROUNDS; round++) {
        uint32_t wait = 0;
        /* ExecutionPoll runs one connection's work per call: 0 means more is ready. */
        for (int i = 0; i < POLLS_PER_ROUND && wait == 0; i++) {
            wait = UINT32_MAX;
            for (int x = 0; x < NEXEC; x++) {
                uint32_t w = api->ExecutionPoll(exs[x]);
                if (w < wait)
                    wait = w;
            }
        }
        struct epoll_event cqe[CQES];
        int n = epoll_wait(exq, cqe, CQES, 0);
        for (int k = 0; k < n; k++)
            ((mq_sqe *)cqe[k].data.ptr)->Completion(&cqe[k]);
        if (n <= 0 && wait) {
            e->mq_wait = wait;
            return;
        }
    }
    e->mq_wait = 0;
}

/* --- loop-thread helpers ------------------------------------------------------------------ */

static ms_stream *smap_find(fpy3_qconn *qc, int64_t sid)
{
    ms_stream *st = qc->buckets[((uint64_t)sid >> 2) % NBUCKETS];
    while (st && st->sid != sid)
        st = st->hnext;
    return st;
}

static void smap_put(fpy3_qconn *qc, ms_stream *st)
{
    ms_stream **b = &qc->buckets[((uint64_t)st->sid >> 2) % NBUCKETS];
    st->hnext = *b;
    *b = st;
    st->in_map = 1;
}

static void smap_del(fpy3_qconn *qc, ms_stream *st)
{
    if (!st->in_map)
        return;
    for (ms_stream **p = &qc->buckets[((uint64_t)st->sid >> 2) % NBUCKETS]; *p; p = &(*p)->hnext)
        if (*p == st) {
            *p = st->hnext;
            break;
        }
    st->in_map = 0;
}

/* The stop list: stop_reading reaches the app with the next batch, not inside the
 * shutdown_stream call that caused it. */
static void stop_queue(fpy3_engine *e, ms_stream *st)
{
    if (st->stop_queued)
        return;
    st->stop_queued = 1;
    st->stop_next = e->stops;
    e->stops = st;
}

static void stop_unqueue(fpy3_engine *e, ms_stream *st)
{
    if (!st->stop_queued)
        return;
    for (ms_stream **p = &e->stops; *p; p = &(*p)->stop_next)
        if (*p == st) {
            *p = st->stop_next;
            break;
        }
    st->stop_queued = 0;
    st->stop_next = NULL;
}

static void stream_free(fpy3_engine *e, ms_stream *st)
{
    stop_unqueue(e, st);
    if (st->rx.bufs != st->rx.inl)
        free(st->rx.bufs);
    free(st);
}

static void uncount(fpy3_qconn *qc)
{
    if (qc->counted) {
        qc->counted = 0;
        qc->b.e->nactive--;
    }
}

/* The app forgets the connection now; MsQuic's events for it are still handled. */
static void app_detach(fpy3_qconn *qc)
{
    void *ac = qc->b.ac;
    uncount(qc);
    fpy3_dirty_del(qc);
    if (!ac)
        return;
    qc->b.ac = NULL;
    qc->b.e->b.cb.conn_close(ac);
}

static void shutdown_now(fpy3_qconn *qc)
{
    qc->close_when_sent = 0;
    api->ConnectionShutdown(qc->h, MQ_CONN_SHUTDOWN_FLAG_NONE, qc->close_code);
}

/* MsQuic's ConnectionShutdown drops stream data not yet sent, so a clean close
 * (APP_NO_ERROR: a drained connection whose GOAWAY may still be queued) waits until
 * every StreamSend has completed; an error closes at once. */
static void conn_shutdown(fpy3_qconn *qc, uint64_t code)
{
    if (qc->state != QC_CLOSING) {
        qc->state = QC_CLOSING;
        qc->close_code = code;
        if (code == APP_NO_ERROR && qc->sends_out)
            qc->close_when_sent = 1;
        else
            shutdown_now(qc);
    }
    app_detach(qc);
}

/* An app callback failed: close with the code it chose. */
static void app_fail(fpy3_qconn *qc)
{
    conn_shutdown(qc, qc->err_set ? qc->err : APP_INTERNAL_ERROR);
}

/* Gives the pending indication back to MsQuic once the app's credit covers it. After
 * the FIN the peer can send nothing more, so nothing is left to hold back: complete at
 * once (the app may never credit the last bytes, and MsQuic ends a stream only when
 * all its data is completed). Never while the indication is being handed to the app:
 * MsQuic may release its bytes and indicate the next one as soon as it is called. */
static void try_complete(ms_stream *st)
{
    if (st->rx_pending && !st->in_recv &&
        (st->discard || st->fin_seen || st->rx_credit >= st->rx_base + st->rx_len)) {
        st->rx_pending = 0;
        api->StreamReceiveComplete(st->h, st->rx_len);
    }
}

static void on_recv(fpy3_engine *e, ms_stream *st)
{
    fpy3_qconn *qc = st->qc;
    st->rx_pending = 1;
    st->rx_base = st->rx.offset;
    st->rx_len = st->rx.total;
    int fin = (st->rx.flags & MQ_RECEIVE_FLAG_FIN) != 0;
    const mq_buffer *bufs = st->rx.bufs;
    st->in_recv = 1;
    if (qc->b.ac && !st->discard && !st->fin_seen) {
        uint32_t last = st->rx.nbuf;
        while (last && bufs[last - 1].Length == 0)
            last--;
        for (uint32_t i = 0; i < last && qc->b.ac && !st->discard; i++) {
            if (!bufs[i].Length)
                continue;
            int f = fin && i + 1 == last;
            if (e->b.cb.recv(qc->b.ac, st->sid, bufs[i].Buffer, bufs[i].Length, f) < 0) {
                app_fail(qc);
                break;
            }
            if (f)
                st->fin_seen = 1;
        }
        if (qc->b.ac && fin && !st->fin_seen && !st->discard) {
            st->fin_seen = 1;
            if (e->b.cb.recv(qc->b.ac, st->sid, NULL, 0, 1) < 0)
                app_fail(qc);
        }
    }
    st->in_recv = 0;
    /* Done with the list before MsQuic may reuse the payload fields. */
    if (st->rx.bufs != st->rx.inl) {
        free(st->rx.bufs);
        st->rx.bufs = st->rx.inl;
    }
    if (!qc->b.ac)
        st->discard = 1;
    try_complete(st);
}

static void write_conn(fpy3_engine *e, fpy3_qconn *qc)
{
    fpy3_vec vec[16];
    for (int i = 0; i < MAX_PULLS && qc->b.ac; i++) {
        int64_t sid = -1;
        int fin = 0;
        long nvec = e->b.cb.pull(qc->b.ac, &sid, &fin, vec, 16);
        if (nvec < 0) {
            app_fail(qc);
            return;
        }
        if (sid < 0)
            return;
        uint64_t total = 0;
        for (long j = 0; j < nvec; j++)
            total += vec[j].len;
        ms_stream *st = smap_find(qc, sid);
        if (!st || st->wr_shut) {
            /* Nowhere to send it: the app must drop the stream's output. */
            if (st)
                e->b.cb.shut_wr(qc->b.ac, sid);
            else if (e->b.cb.written(qc->b.ac, sid, (size_t)total) < 0)
                app_fail(qc);
            if (!st && !total)
                return;
            continue;
        }
        if (!total && !fin)
            return; /* nothing to push: avoid spinning on an empty stream */
        /* Owned by the engine from here: freed when its SEND_COMPLETE is handled. */
        ms_send *rec = calloc(1, sizeof(*rec) + (size_t)nvec * sizeof(mq_buffer));
        if (!rec) {
            app_fail(qc); /* the bytes cannot go: the connection fails, loudly */
            return;
        }
        rec->st = st;
        rec->len = total;
        rec->n = (uint32_t)nvec;
        ev_init(&rec->ev_done, EV_SEND_DONE, rec);
        for (long j = 0; j < nvec; j++) {
            rec->b[j].Buffer = vec[j].base;
            rec->b[j].Length = (uint32_t)vec[j].len;
        }
        mq_status rv = api->StreamSend(st->h, rec->b, rec->n, fin ? MQ_SEND_FLAG_FIN : 0, rec);
        if (MQ_FAILED(rv)) {
            free(rec);
            st->wr_shut = 1;
            e->b.cb.shut_wr(qc->b.ac, sid);
            continue;
        }
        qc->sends_out++;
        if (e->b.cb.written(qc->b.ac, sid, (size_t)total) < 0) {
            app_fail(qc);
            return;
        }
    }
    if (qc->b.ac)
        fpy3_dirty_add(qc); /* more than MAX_PULLS: the next flush goes on */
}

static int write_one(fpy3_qconn *qc)
{
    write_conn(qc->b.e, qc);
    return 0; /* MsQuic queues its own sends: never full */
}

static void conn_free(fpy3_engine *e, fpy3_qconn *qc)
{
    app_detach(qc);
    for (int b = 0; b < NBUCKETS; b++)
        while (qc->buckets[b]) {
            ms_stream *st = qc->buckets[b];
            qc->buckets[b] = st->hnext;
            api->StreamClose(st->h); /* not shut down yet: MsQuic aborts it */
            stream_free(e, st);
        }
    fpy3_conn_table_remove(&e->b, qc);
    api->ConnectionClose(qc->h); /* async (MQ_PARAM_CONN_CLOSE_ASYNC) */
    free(qc);
    e->live--;
}

static void handle(fpy3_engine *e, ms_event *ev)
{
    switch (ev->type) {
    case EV_CONNECTED: {
        fpy3_qconn *qc = ev->obj;
        if (qc->state != QC_HANDSHAKE)
            break;
        qc->state = QC_OPEN;
        if (e->freeing || e->closed_all || fpy3_conn_table_add(&e->b, qc) < 0) {
            conn_shutdown(qc, e->closed_all ? e->closed_all_code : APP_INTERNAL_ERROR);
            break;
        }
        qc->counted = 1;
        e->nactive++;
        qc->b.ac = e->b.cb.conn_open(e->b.app, qc);
        if (!qc->b.ac)
            conn_shutdown(qc, APP_INTERNAL_ERROR);
        else
            fpy3_dirty_add(qc); /* the app's control streams */
        break;
    }
    case EV_CONN_SHUTDOWN:
        uncount(ev->obj);
        break;
    case EV_CONN_FAILED:
        conn_shutdown(ev->obj, APP_INTERNAL_ERROR); /* already shut down: detaches the app */
        break;
    case EV_CONN_DONE:
        conn_free(e, ev->obj);
        break;
    case EV_STREAM_STARTED: {
        ms_stream *st = ev->obj;
        smap_put(st->qc, st);
        if (!st->qc->b.ac)
            st->discard = 1;
        break;
    }
    case EV_START_COMPLETE: {
        ms_stream *st = ev->obj;
        fpy3_qconn *qc = st->qc;
        if ((MQ_FAILED(st->start_status) || (int64_t)st->start_id != st->sid) && qc->b.ac)
            conn_shutdown(qc, APP_CRITICAL_STREAM); /* our id guess was wrong */
        break;
    }
    case EV_RECV:
        on_recv(e, ev->obj);
        break;
    case EV_SEND_DONE: {
        ms_send *rec = ev->obj;
        ms_stream *st = rec->st;
        fpy3_qconn *qc = st->qc;
        if (!rec->canceled && qc->b.ac && e->b.cb.acked(qc->b.ac, st->sid, rec->len) < 0)
            app_fail(qc);
        free(rec);
        if (--qc->sends_out == 0 && qc->close_when_sent)
            shutdown_now(qc);
        break;
    }
    case EV_PEER_FIN: {
        ms_stream *st = ev->obj;
        fpy3_qconn *qc = st->qc;
        if (qc->b.ac && !st->fin_seen && !st->discard) {
            st->fin_seen = 1;
            if (e->b.cb.recv(qc->b.ac, st->sid, NULL, 0, 1) < 0)
                app_fail(qc);
        }
        break;
    }
    case EV_PEER_RESET: {
        ms_stream *st = ev->obj;
        fpy3_qconn *qc = st->qc;
        st->code = st->peer_reset_code;
        if (qc->b.ac && e->b.cb.peer_reset(qc->b.ac, st->sid, st->code) < 0)
            app_fail(qc);
        break;
    }
    case EV_PEER_STOP: {
        ms_stream *st = ev->obj;
        st->code = st->peer_stop_code;
        st->wr_shut = 1; /* MsQuic answers with RESET_STREAM itself */
        if (st->qc->b.ac)
            e->b.cb.shut_wr(st->qc->b.ac, st->sid);
        break;
    }
    case EV_STREAM_DONE: {
        ms_stream *st = ev->obj;
        fpy3_qconn *qc = st->qc;
        smap_del(qc, st);
        if (qc->b.ac && e->b.cb.stream_close(qc->b.ac, st->sid, st->code) < 0)
            app_fail(qc);
        api->StreamClose(st->h);
        if ((st->sid & 3) == 0 && qc->b.ac) {
            /* MsQuic lets the peer open another as soon as this one is closed. */
            qc->closed_bidi++;
            e->b.cb.max_streams(qc->b.ac, e->cfg.max_streams_bidi + qc->closed_bidi);
        }
        stream_free(e, st);
        break;
    }
    }
}

/* stop_reading for the streams the app stopped reading since the last batch. */
static int run_stops(fpy3_engine *e)
{
    int n = 0;
    while (e->stops) {
        ms_stream *st = e->stops;
        stop_unqueue(e, st);
        fpy3_qconn *qc = st->qc;
        if (qc->b.ac && st->in_map && e->b.cb.stop_reading(qc->b.ac, st->sid) < 0)
            app_fail(qc);
        n++;
    }
    return n;
}

/* Hands the queued events to the app; returns their number. */
static int drain(fpy3_engine *e)
{
    ms_event *list = e->qhead;
    e->qhead = e->qtail = NULL;
    /* Off the queue: each may be queued again (the next RECEIVE) once handled. */
    for (ms_event *ev = list; ev; ev = ev->next)
        ev->queued = 0;
    int n = 0;
    while (list) {
        ms_event *ev = list;
        list = ev->next; /* before handling: it may free ev's object */
        handle(e, ev);
        n++;
    }
    return n + run_stops(e);
}

/* --- engine API ----------------------------------------------------------------------- */

static uint32_t pow2_at_least(uint64_t v)
{
    uint64_t p = 4096;
    while (p < v && p < (1ull << 31))
        p <<= 1;
    return (uint32_t)p;
}

static fpy3_engine *ms_new(int fd, const fpy3_engine_config *cfg, const fpy3_engine_app *cb,
                           void *app, char *err, size_t errlen)
{
    (void)fd;
    if (fpy3_msquic_load(err, errlen) < 0)
        return NULL;
    if (ex_driver) {
        fpy3_seterr(err, errlen, "MsQuic serves one HTTP/3 server per process");
        return NULL;
    }
    if (executions_make(err, errlen) < 0)
        return NULL;
    fpy3_engine *e = calloc(1, sizeof(*e)); /* freed by ms_free */
    if (!e) {
        fpy3_seterr(err, errlen, "out of memory");
        return NULL;
    }
    ex_driver = e;
    fpy3_engine_base_init(&e->b, &fpy3_engine_msquic, cb, app);
    e->cfg = *cfg;
    e->cfg.cert_file = e->cfg.key_file = e->cfg.qlog_dir = e->cfg.alpn = NULL;
    e->cfg.listen_host = NULL;
    e->accepting = 1;
    e->mq_wait = UINT32_MAX;
    if (!e->cfg.close_wait_ms)
        e->cfg.close_wait_ms = 3000;
    atomic_init(&e->reg_closed, 0);
    if (!e->cfg.max_streams_bidi)
        e->cfg.max_streams_bidi = 100;
    const char *alpn = cfg->alpn ? cfg->alpn : "h3";
    size_t alen = strlen(alpn);
    if (!alen || alen > 255) {
        fpy3_seterr(err, errlen, "bad ALPN");
        goto fail;
    }
    memcpy(e->alpnbuf, alpn, alen);
    e->alpn.Buffer = e->alpnbuf;
    e->alpn.Length = (uint32_t)alen;

    /* Process-wide: a worker is a process, so these are per worker. */
    mq_status rv;
    if (cfg->retry || cfg->handshake_memory) {
        /* Retry for every new connection, or once handshakes hold more than
         * handshake_memory (MsQuic's limit is a share of the machine's memory, in
         * 65535ths; MsQuic has no bound on their number). */
        uint16_t share = 0;
        uint64_t ram = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE);
        if (!cfg->retry && ram) {
            uint64_t v = cfg->handshake_memory * 65535u / ram;
            share = (uint16_t)(v < 1 ? 1 : v > 65535 ? 65535 : v);
        }
        rv = api->SetParam(NULL, MQ_PARAM_GLOBAL_RETRY_MEMORY_PERCENT, sizeof(share), &share);
        if (MQ_FAILED(rv)) {
            fpy3_seterr(err, errlen, "MsQuic retry: status 0x%x", rv);
            goto fail;
        }
    }
    if (cfg->worker_id) {
        /* The worker id in bytes 1-4 of MsQuic's connection ids, as ngtcp2's. */
        mq_global_settings gs = {
            .IsSetFlags = MQ_GSET_LOAD_BALANCING_MODE | MQ_GSET_FIXED_SERVER_ID,
            .LoadBalancingMode = MQ_LOAD_BALANCING_SERVER_ID_FIXED,
            .FixedServerID = htonl(cfg->worker_id),
        };
        rv = api->SetParam(NULL, MQ_PARAM_GLOBAL_GLOBAL_SETTINGS, sizeof(gs), &gs);
        if (MQ_FAILED(rv)) {
            fpy3_seterr(err, errlen, "MsQuic load-balancing mode: status 0x%x", rv);
            goto fail;
        }
    }

    mq_registration_config rc = {.AppName = "fpy3", .ExecutionProfile = 0};
    rv = api->RegistrationOpen(&rc, &e->reg);
    if (MQ_FAILED(rv)) {
        e->reg = NULL;
        fpy3_seterr(err, errlen, "MsQuic RegistrationOpen: status 0x%x", rv);
        goto fail;
    }
    /* The master's key, shared by its workers: a datagram for a worker that is gone
     * reaches another one, whose stateless reset the client then accepts. MsQuic takes
     * it only once it is set up, that is after the first RegistrationOpen. */
    rv = api->SetParam(NULL, MQ_PARAM_GLOBAL_STATELESS_RESET_KEY, sizeof(cfg->static_secret),
                       cfg->static_secret);
    if (MQ_FAILED(rv)) {
        fpy3_seterr(err, errlen, "MsQuic stateless reset key: status 0x%x", rv);
        goto fail;
    }
    mq_settings s;
    memset(&s, 0, sizeof(s));
    s.IsSetFlags = MQ_SET_IDLE_TIMEOUT | MQ_SET_STREAM_RECV_WINDOW |
                   MQ_SET_STREAM_RECV_WINDOW_BIDI_REMOTE | MQ_SET_CONN_FLOW_CONTROL_WINDOW |
                   MQ_SET_PEER_BIDI_STREAM_COUNT | MQ_SET_PEER_UNIDI_STREAM_COUNT |
                   MQ_SET_SEND_BUFFERING | MQ_SET_MAXIMUM_MTU | MQ_SET_HANDSHAKE_IDLE_TIMEOUT;
    s.IdleTimeoutMs = cfg->idle_timeout_ms;
    s.HandshakeIdleTimeoutMs = cfg->handshake_timeout_ms ? cfg->handshake_timeout_ms : 10000;
    s.StreamRecvWindowDefault = pow2_at_least(cfg->initial_max_stream_data);
    s.StreamRecvWindowBidiRemoteDefault = s.StreamRecvWindowDefault;
    /* MsQuic grows stream windows itself, never the connection's: open it fully. */
    uint64_t conn_window = cfg->max_window ? cfg->max_window : cfg->initial_max_data;
    s.ConnFlowControlWindow = (uint32_t)(conn_window > 0xffffffffu ? 0xffffffffu : conn_window);
    s.PeerBidiStreamCount =
        (uint16_t)(e->cfg.max_streams_bidi > 65535 ? 65535 : e->cfg.max_streams_bidi);
    s.PeerUnidiStreamCount = (uint16_t)(cfg->max_streams_uni ? cfg->max_streams_uni : 3);
    s.SendBufferingEnabled = 0; /* our buffers until acked: no copy */
    size_t mtu = (cfg->max_udp_payload ? cfg->max_udp_payload : 1452) + 48; /* IPv6 + UDP */
    s.MaximumMtu = (uint16_t)(mtu < 1280 ? 1280 : mtu > 1500 ? 1500 : mtu);
    rv = api->ConfigurationOpen(e->reg, &e->alpn, 1, &s, sizeof(s), NULL, &e->config);
    if (MQ_FAILED(rv)) {
        e->config = NULL;
        fpy3_seterr(err, errlen, "MsQuic ConfigurationOpen: status 0x%x", rv);
        goto fail;
    }
    mq_certificate_file cf = {.PrivateKeyFile = cfg->key_file, .CertificateFile = cfg->cert_file};
    mq_credential_config cc = {.Type = MQ_CREDENTIAL_TYPE_CERTIFICATE_FILE,
                               .Flags = MQ_CREDENTIAL_FLAG_NONE,
                               .CertificateFile = &cf};
    rv = api->ConfigurationLoadCredential(e->config, &cc);
    if (MQ_FAILED(rv)) {
        fpy3_seterr(err, errlen, "loading %s / %s: MsQuic status 0x%x",
               cfg->cert_file ? cfg->cert_file : "(null)", cfg->key_file ? cfg->key_file : "(null)",
               rv);
        goto fail;
    }

    mq_addr addr;
    memset(&addr, 0, sizeof(addr));
    const char *host = cfg->listen_host ? cfg->listen_host : "";
    if (inet_pton(AF_INET, host, &addr.Ipv4.sin_addr) == 1) {
        addr.Ipv4.sin_family = AF_INET;
    } else if (inet_pton(AF_INET6, host, &addr.Ipv6.sin6_addr) == 1) {
        /* MsQuic matches a listener by family: "::" alone would refuse IPv4 clients. */
        addr.Ipv6.sin6_family =
            IN6_IS_ADDR_UNSPECIFIED(&addr.Ipv6.sin6_addr) ? AF_UNSPEC : AF_INET6;
    } else if (host[0]) {
        fpy3_seterr(err, errlen, "MsQuic listener: %s is not a numeric address", host);
        goto fail;
    } else {
        addr.Ip.sa_family = AF_UNSPEC; /* every address, both families */
    }
    addr.Ipv4.sin_port = htons(cfg->listen_port); /* same place in all three */
    rv = api->ListenerOpen(e->reg, listener_cb, e, &e->listener);
    if (MQ_FAILED(rv)) {
        e->listener = NULL;
        fpy3_seterr(err, errlen, "MsQuic ListenerOpen: status 0x%x", rv);
        goto fail;
    }
    uint16_t partition = 0; /* one socket, no reuseport program: see the top */
    rv = api->SetParam(e->listener, MQ_PARAM_LISTENER_PARTITION_INDEX, sizeof(partition),
                       &partition);
    if (MQ_FAILED(rv)) {
        fpy3_seterr(err, errlen,
                    "MsQuic listener partition: status 0x%x (an io_uring build of MsQuic "
                    "cannot do it; fpy3 needs the epoll one)",
                    rv);
        goto fail;
    }
    rv = api->ListenerStart(e->listener, &e->alpn, 1, &addr);
    if (MQ_FAILED(rv)) {
        fpy3_seterr(err, errlen, "MsQuic cannot listen on [%s]:%u (UDP): %s", host[0] ? host : "*",
               cfg->listen_port, rv < 4096 ? strerror((int)rv) : "error");
        goto fail;
    }
    pump(e); /* MsQuic's start-up work */
    return e;
fail:
    e->listener_stopped = 1; /* never started: closing it waits for nothing */
    ms_free(e);
    return NULL;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Runs MsQuic and hands its events on until done(e) or the deadline (mono_ms) passed;
 * 0 when done. */
static int run_until(fpy3_engine *e, int (*done)(fpy3_engine *e), int64_t deadline)
{
    for (;;) {
        pump(e);
        drain(e);
        if (done(e))
            return 0;
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return -1;
        int64_t wait = left < 100 ? left : 100;
        if (e->mq_wait < wait)
            wait = e->mq_wait;
        struct pollfd p = {.fd = exq, .events = POLLIN};
        poll(&p, 1, (int)wait);
    }
}

static int none_live(fpy3_engine *e) { return e->live == 0; }
static int listener_done(fpy3_engine *e) { return e->listener_stopped; }
static int registration_done(fpy3_engine *e) { return atomic_load(&e->reg_closed); }

static int none_waiting_for_sends(fpy3_engine *e)
{
    for (uint32_t i = 0; i < e->b.nslots; i++) {
        fpy3_qconn *qc = e->b.slots[i];
        if (qc && qc->close_when_sent)
            return 0;
    }
    return 1;
}

/* RegistrationClose2's callback, on MsQuic's registration-close thread. */
static void registration_closed(void *ctx)
{
    fpy3_engine *e = ctx;
    atomic_store(&e->reg_closed, 1);
}

/* Closes MsQuic's objects in order while this thread keeps MsQuic running, all within
 * cfg.close_wait_ms; 0 when all of them are closed. Past the deadline it stops: what is
 * left still refers to the engine, so the engine must then stay allocated. */
static int close_msquic(fpy3_engine *e)
{
    int64_t deadline = mono_ms() + (int64_t)e->cfg.close_wait_ms;
    int clean = 1;
    if (e->listener) {
        if (!e->listener_stopped) {
            api->ListenerStop(e->listener);
            run_until(e, listener_done, deadline);
        }
        if (e->listener_stopped)
            api->ListenerClose(e->listener); /* stopped: returns at once */
        else
            clean = 0;
    }
    if (e->reg) {
        /* Clean closes still waiting for their last sends (GOAWAY): give them a moment. */
        int64_t sends = mono_ms() + SENDS_WAIT_MS;
        run_until(e, none_waiting_for_sends, sends < deadline ? sends : deadline);
        /* Not silent: connections closed just before (a drain) still send their
         * CONNECTION_CLOSE, so clients learn at once instead of at their idle timeout. */
        api->RegistrationShutdown(e->reg, MQ_CONN_SHUTDOWN_FLAG_NONE, APP_NO_ERROR);
        if (run_until(e, none_live, deadline) < 0)
            clean = 0;
    }
    if (e->config)
        api->ConfigurationClose(e->config); /* the connections' references keep it */
    if (e->reg && clean) {
        /* It completes on MsQuic's thread for it once this thread has run MsQuic's
         * last work (its workers stop inside ExecutionPoll). */
        api->RegistrationClose2(e->reg, registration_closed, e);
        if (run_until(e, registration_done, deadline) < 0)
            clean = 0;
    }
    return clean ? 0 : -1;
}

static void ms_free(fpy3_engine *e)
{
    if (!e)
        return;
    e->accepting = 0;
    e->freeing = 1;
    for (uint32_t i = 0; i < e->b.nslots; i++)
        if (e->b.slots[i])
            app_detach(e->b.slots[i]);
    int clean = close_msquic(e);
    if (ex_driver == e)
        ex_driver = NULL;
    if (clean < 0) {
        /* Left allocated, never freed under MsQuic: its objects may still call back. */
        left_open++;
        return;
    }
    fpy3_engine_base_free(&e->b);
    free(e);
}

static int ms_fd(fpy3_engine *e)
{
    (void)e;
    return exq;
}

static void write_dirty(fpy3_engine *e, int honor_defer)
{
    fpy3_dirty_run(&e->b, honor_defer, write_one);
}

static int ms_read(fpy3_engine *e)
{
    pump(e);
    int n = drain(e);
    write_dirty(e, 1);
    return n;
}

static int ms_expire(fpy3_engine *e)
{
    pump(e);
    int n = drain(e);
    write_dirty(e, 0);
    return n;
}

static int ms_flush(fpy3_engine *e)
{
    write_dirty(e, 0);
    pump(e); /* send now: what it raises waits for the next read/expire */
    return 0;
}

static int64_t ms_next_timeout_ms(fpy3_engine *e)
{
    if (e->qhead || e->b.dirty || e->stops)
        return 0;
    return e->mq_wait == UINT32_MAX ? -1 : (int64_t)e->mq_wait;
}

static int ms_want_write(fpy3_engine *e)
{
    (void)e; /* MsQuic queues its own sends */
    return 0;
}

static void ms_stop_accepting(fpy3_engine *e) { e->accepting = 0; }
static size_t ms_conn_count(fpy3_engine *e) { return e->nactive; }

/* ConnectionShutdown with app_error on every connection the app has, the registration's
 * shutdown for those MsQuic still handshakes, and a bounded wait for SHUTDOWN_COMPLETE:
 * MsQuic has no event for "CONNECTION_CLOSE sent", but a connection whose shutdown
 * completed has sent it. Objects are freed only as their SHUTDOWN_COMPLETE comes. */
static void ms_close_all(fpy3_engine *e, uint64_t app_error)
{
    e->accepting = 0;
    e->closed_all = 1;
    e->closed_all_code = app_error;
    for (uint32_t i = 0; i < e->b.nslots; i++) {
        fpy3_qconn *qc = e->b.slots[i];
        if (!qc)
            continue;
        if (qc->state != QC_CLOSING || qc->close_when_sent) {
            qc->state = QC_CLOSING;
            qc->close_code = app_error;
            shutdown_now(qc);
        }
        app_detach(qc);
    }
    if (e->reg)
        api->RegistrationShutdown(e->reg, MQ_CONN_SHUTDOWN_FLAG_NONE, app_error);
    uint64_t wait = e->cfg.close_wait_ms < CLOSE_ALL_WAIT_MS ? e->cfg.close_wait_ms
                                                             : CLOSE_ALL_WAIT_MS;
    run_until(e, none_live, mono_ms() + (int64_t)wait);
}

static const struct sockaddr *ms_conn_peer(fpy3_qconn *qc, uint32_t *len)
{
    *len = qc->peerlen;
    return (const struct sockaddr *)&qc->peer;
}

static const struct sockaddr *ms_conn_local(fpy3_qconn *qc, uint32_t *len)
{
    *len = qc->locallen;
    return (const struct sockaddr *)&qc->local;
}

static void ms_mark(fpy3_qconn *qc)
{
    if (qc->b.ac)
        fpy3_dirty_add(qc);
}

static int ms_open_uni(fpy3_qconn *qc, int64_t *sid)
{
    /* Owned by the engine: freed at its SHUTDOWN_COMPLETE or with the connection. */
    ms_stream *st = calloc(1, sizeof(*st));
    if (!st)
        return -1;
    stream_init(st, qc);
    /* StreamStart from outside MsQuic's processing is queued, so the id comes later;
     * ids are given in start order, and START_COMPLETE checks the guess. */
    st->sid = qc->next_uni;
    mq_status rv = api->StreamOpen(qc->h, MQ_STREAM_OPEN_FLAG_UNIDIRECTIONAL, stream_cb, st, &st->h);
    if (MQ_FAILED(rv)) {
        free(st);
        return -1;
    }
    rv = api->StreamStart(st->h, MQ_STREAM_START_FLAG_IMMEDIATE);
    if (MQ_FAILED(rv)) {
        api->StreamClose(st->h);
        free(st);
        return -1;
    }
    qc->next_uni += 4;
    smap_put(qc, st);
    *sid = st->sid;
    return 0;
}

static void ms_extend(fpy3_qconn *qc, int64_t sid, uint64_t n)
{
    if (sid < 0)
        return; /* MsQuic's connection window follows its streams' */
    ms_stream *st = smap_find(qc, sid);
    if (!st)
        return;
    st->rx_credit += n;
    try_complete(st);
}

static void ms_extend_streams_bidi(fpy3_qconn *qc, uint64_t n)
{
    (void)qc; /* MsQuic grants a new stream id for each closed one */
    (void)n;
}

static uint64_t ms_max_streams_bidi(fpy3_qconn *qc) { return qc->b.e->cfg.max_streams_bidi; }

static int ms_shutdown_stream(fpy3_qconn *qc, int64_t sid, uint64_t app_error, int how)
{
    ms_stream *st = smap_find(qc, sid);
    if (!st || qc->state == QC_CLOSING)
        return -1;
    int flags = 0;
    if ((how & FPY3_SHUT_RD) && !st->discard) {
        flags |= MQ_STREAM_SHUTDOWN_FLAG_ABORT_RECEIVE;
        st->discard = 1;
        try_complete(st);
        stop_queue(qc->b.e, st);
    }
    if ((how & FPY3_SHUT_WR) && !st->wr_shut) {
        flags |= MQ_STREAM_SHUTDOWN_FLAG_ABORT_SEND;
        st->wr_shut = 1;
    }
    if (!flags)
        return 0;
    st->code = app_error;
    mq_status rv = api->StreamShutdown(st->h, flags, app_error);
    return MQ_FAILED(rv) ? -1 : 0;
}

static void ms_conn_error(fpy3_qconn *qc, uint64_t app_error)
{
    if (qc->err_set)
        return;
    qc->err = app_error;
    qc->err_set = 1;
}

static void ms_conn_close(fpy3_qconn *qc, uint64_t app_error)
{
    if (qc->state == QC_CLOSING)
        return;
    ms_conn_error(qc, app_error);
    conn_shutdown(qc, qc->err);
}

const fpy3_engine_ops fpy3_engine_msquic = {
    .new = ms_new,
    .free = ms_free,
    .fd = ms_fd,
    .read = ms_read,
    .expire = ms_expire,
    .flush = ms_flush,
    .next_timeout_ms = ms_next_timeout_ms,
    .want_write = ms_want_write,
    .stop_accepting = ms_stop_accepting,
    .conn_count = ms_conn_count,
    .close_all = ms_close_all,
    .each = fpy3_common_each,
    .conn_handle = fpy3_common_conn_handle,
    .conn_find = fpy3_common_conn_find,
    .conn_peer = ms_conn_peer,
    .conn_local = ms_conn_local,
    .mark = ms_mark,
    .defer = fpy3_common_defer,
    .open_uni = ms_open_uni,
    .extend = ms_extend,
    .extend_streams_bidi = ms_extend_streams_bidi,
    .max_streams_bidi = ms_max_streams_bidi,
    .shutdown_stream = ms_shutdown_stream,
    .conn_error = ms_conn_error,
    .conn_close = ms_conn_close,
};
