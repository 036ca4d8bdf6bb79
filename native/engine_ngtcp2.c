/* engine_ngtcp2: the QUIC server engine (engine.h) on ngtcp2 + GnuTLS.
 *
 * One engine per UDP socket, driven from the loop thread: recvmmsg batches in,
 * sendmmsg batches out (UDP GSO when the kernel takes it), one timer for all
 * connections (a min-heap on each connection's ngtcp2 expiry).
 *
 * Server connection ids are SCID_LEN bytes: [0] random, [1..4] the worker id
 * (big-endian), the rest random, so a reuseport BPF program can steer on them.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

_Static_assert(sizeof(fpy3_vec) == sizeof(ngtcp2_vec), "fpy3_vec must match ngtcp2_vec");

#define SCID_LEN 18
#define RX_BATCH 64
#define RX_ROUNDS 16 /* recvmmsg calls per ng_read: bounds one loop turn */
#define RX_BUFSZ 2048
#define RX_CTRLSZ 128
#define TX_BUFSZ (1 << 20)
#define TX_MAXMSG 512
#define TX_CTRLSZ (CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(sizeof(int)))
#define GSO_MAX_BYTES 65000 /* below the 64 KiB IP limit with headers */
#define GSO_MAX_SEGS 64     /* the kernel's UDP_MAX_SEGMENTS */
#define ONEOFF_MAX 1500     /* Retry, version negotiation, stateless reset or close */
#define SR_PER_SEC 100      /* stateless resets sent per second at most */
#define NO_HEAP UINT32_MAX

enum { QC_ACTIVE, QC_CLOSING, QC_DRAINING };

/* --- small helpers ----------------------------------------------------------------- */

static ngtcp2_tstamp mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NGTCP2_SECONDS + (uint64_t)ts.tv_nsec;
}

static uint64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * NGTCP2_SECONDS + (uint64_t)ts.tv_nsec;
}

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Nonce-grade randomness is enough for connection ids and padding; secrets use
 * the static secret. */
static void rand_bytes(void *p, size_t n) { gnutls_rnd(GNUTLS_RND_NONCE, p, n); }

/* --- connection id map: open addressing, linear probing, backward-shift delete ---- */

typedef struct {
    ngtcp2_cid cid;
    fpy3_qconn *qc; /* NULL = empty slot */
} cid_slot;

typedef struct {
    cid_slot *slots;
    size_t cap; /* power of two */
    size_t n;
    uint64_t seed; /* keyed: client-chosen ids must not pick our buckets */
} cid_map;

static uint64_t cid_hash(const cid_map *m, const uint8_t *p, size_t len)
{
    uint64_t h = m->seed ^ (len * 0x9e3779b97f4a7c15ull);
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        p += 8;
        len -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, len);
    h = (h ^ w) * 0x94d049bb133111ebull;
    return h ^ (h >> 29);
}

static int cid_eq(const ngtcp2_cid *a, const uint8_t *p, size_t len)
{
    return a->datalen == len && memcmp(a->data, p, len) == 0;
}

static fpy3_qconn *cid_find(const cid_map *m, const uint8_t *p, size_t len)
{
    size_t mask = m->cap - 1, i = cid_hash(m, p, len) & mask;
    for (;; i = (i + 1) & mask) {
        const cid_slot *s = &m->slots[i];
        if (!s->qc)
            return NULL;
        if (cid_eq(&s->cid, p, len))
            return s->qc;
    }
}

static int cid_grow(cid_map *m)
{
    size_t ncap = m->cap * 2;
    cid_slot *old = m->slots, *ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return -1;
    size_t ocap = m->cap;
    m->slots = ns;
    m->cap = ncap;
    for (size_t i = 0; i < ocap; i++) {
        if (!old[i].qc)
            continue;
        size_t j = cid_hash(m, old[i].cid.data, old[i].cid.datalen) & (ncap - 1);
        while (ns[j].qc)
            j = (j + 1) & (ncap - 1);
        ns[j] = old[i];
    }
    free(old);
    return 0;
}

static int cid_put(cid_map *m, const ngtcp2_cid *cid, fpy3_qconn *qc)
{
    if ((m->n + 1) * 4 > m->cap * 3 && cid_grow(m) < 0)
        return -1;
    size_t mask = m->cap - 1, i = cid_hash(m, cid->data, cid->datalen) & mask;
    for (;; i = (i + 1) & mask) {
        cid_slot *s = &m->slots[i];
        if (!s->qc) {
            s->cid = *cid;
            s->qc = qc;
            m->n++;
            return 0;
        }
        if (cid_eq(&s->cid, cid->data, cid->datalen)) {
            s->qc = qc;
            return 0;
        }
    }
}

static void cid_del(cid_map *m, const ngtcp2_cid *cid, const fpy3_qconn *qc)
{
    size_t mask = m->cap - 1, i = cid_hash(m, cid->data, cid->datalen) & mask;
    for (;; i = (i + 1) & mask) {
        if (!m->slots[i].qc)
            return;
        if (cid_eq(&m->slots[i].cid, cid->data, cid->datalen))
            break;
    }
    if (m->slots[i].qc != qc)
        return; /* the id now names another connection */
    m->slots[i].qc = NULL;
    m->n--;
    /* Backward shift: pull later entries of the probe run into the hole. */
    for (size_t j = (i + 1) & mask; m->slots[j].qc; j = (j + 1) & mask) {
        size_t home = cid_hash(m, m->slots[j].cid.data, m->slots[j].cid.datalen) & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = m->slots[j];
            m->slots[j].qc = NULL;
            i = j;
        }
    }
}

/* --- engine and connection state --------------------------------------------------- */

typedef struct {
    struct sockaddr_storage addr;
    socklen_t len;
} sockaddr_buf;

struct fpy3_qconn {
    fpy3_engine *e; /* first: engine.c dispatches on it */
    ngtcp2_conn *conn;
    gnutls_session_t tls;
    ngtcp2_crypto_conn_ref ref;
    void *ac; /* the app's state, set by conn_open */
    uint64_t handle;
    uint32_t slot;
    uint32_t heap_idx;
    ngtcp2_tstamp expiry;
    int state;
    int dirty, defer;
    fpy3_qconn *dnext, *dprev; /* dirty list */
    ngtcp2_cid odcid;          /* the client's first DCID: a map key until close */
    ngtcp2_ccerr ccerr;
    int err_set;
    /* CONNECTION_CLOSE kept for the closing period; owned here, freed in conn_delete. */
    uint8_t *closebuf;
    size_t closelen;
    uint32_t close_rx;
    FILE *qlog;
};

struct fpy3_engine {
    const fpy3_engine_ops *ops; /* first: engine.c dispatches on it */
    int fd, family;
    fpy3_engine_config cfg;
    char *qlog_dir; /* owned copy; NULL = off */
    uint8_t alpn[256];
    size_t alpnlen;
    fpy3_engine_app cb;
    void *app;
    gnutls_certificate_credentials_t cred;
    gnutls_priority_t prio;
    uint16_t port; /* network order */
    sockaddr_buf bound;
    int gso, no_ecn, accepting;
    ngtcp2_tstamp now;

    cid_map map;

    /* handle -> connection: slot index in the low 24 bits, a counter above. */
    fpy3_qconn **slots;
    uint32_t nslots, slotcap;
    uint32_t *freeslots;
    uint32_t nfree;
    uint64_t counter;
    size_t nconns;  /* all, closing and draining ones included */
    size_t nactive; /* those that can still carry data */

    fpy3_qconn **heap;
    uint32_t heapn, heapcap;
    fpy3_qconn **expired; /* scratch for ng_expire */

    fpy3_qconn *dirty;

    /* receive batch */
    uint8_t *rxbuf;
    struct mmsghdr rxmsg[RX_BATCH];
    struct iovec rxiov[RX_BATCH];
    struct sockaddr_storage rxaddr[RX_BATCH];
    uint8_t rxctrl[RX_BATCH][RX_CTRLSZ];

    /* send batch: packets are written in place into txbuf, one msg per GSO run */
    uint8_t *txbuf;
    size_t txlen;
    uint32_t ntx, ntx_sent;
    int blocked; /* EAGAIN: the rest waits for writability */
    struct mmsghdr txmsg[TX_MAXMSG];
    struct iovec txiov[TX_MAXMSG];
    struct sockaddr_storage txaddr[TX_MAXMSG];
    uint8_t txctrl[TX_MAXMSG][TX_CTRLSZ];
    uint16_t txseg[TX_MAXMSG]; /* segment size (== len when one packet) */
    uint8_t txecn[TX_MAXMSG];

    uint32_t sr_tokens;
    ngtcp2_tstamp sr_refill;
};

static void conn_delete(fpy3_qconn *qc);
static void conn_write(fpy3_qconn *qc);
static void ng_extend(fpy3_qconn *qc, int64_t sid, uint64_t n);
static void ng_free(fpy3_engine *e);

/* --- timer heap --------------------------------------------------------------------- */

static void heap_swap(fpy3_engine *e, uint32_t a, uint32_t b)
{
    fpy3_qconn *t = e->heap[a];
    e->heap[a] = e->heap[b];
    e->heap[b] = t;
    e->heap[a]->heap_idx = a;
    e->heap[b]->heap_idx = b;
}

static void heap_up(fpy3_engine *e, uint32_t i)
{
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (e->heap[p]->expiry <= e->heap[i]->expiry)
            break;
        heap_swap(e, i, p);
        i = p;
    }
}

static void heap_down(fpy3_engine *e, uint32_t i)
{
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < e->heapn && e->heap[l]->expiry < e->heap[m]->expiry)
            m = l;
        if (r < e->heapn && e->heap[r]->expiry < e->heap[m]->expiry)
            m = r;
        if (m == i)
            return;
        heap_swap(e, i, m);
        i = m;
    }
}

static void heap_remove(fpy3_engine *e, fpy3_qconn *qc)
{
    uint32_t i = qc->heap_idx;
    if (i == NO_HEAP)
        return;
    qc->heap_idx = NO_HEAP;
    e->heapn--;
    if (i == e->heapn)
        return;
    e->heap[i] = e->heap[e->heapn];
    e->heap[i]->heap_idx = i;
    heap_up(e, i);
    heap_down(e, e->heap[i]->heap_idx);
}

/* Sets qc's expiry and its place in the heap (UINT64_MAX = not in the heap). */
static void heap_set(fpy3_engine *e, fpy3_qconn *qc, ngtcp2_tstamp t)
{
    if (t == UINT64_MAX) {
        heap_remove(e, qc);
        qc->expiry = t;
        return;
    }
    qc->expiry = t;
    if (qc->heap_idx == NO_HEAP) {
        if (e->heapn == e->heapcap) {
            uint32_t ncap = e->heapcap ? e->heapcap * 2 : 64;
            fpy3_qconn **nh = realloc(e->heap, ncap * sizeof(*nh));
            fpy3_qconn **nx = realloc(e->expired, ncap * sizeof(*nx));
            if (nh)
                e->heap = nh;
            if (nx)
                e->expired = nx;
            if (!nh || !nx)
                return; /* no timer: the idle close comes with the next packet */
            e->heapcap = ncap;
        }
        qc->heap_idx = e->heapn;
        e->heap[e->heapn++] = qc;
        heap_up(e, qc->heap_idx);
    } else {
        heap_up(e, qc->heap_idx);
        heap_down(e, qc->heap_idx);
    }
}

static void update_timer(fpy3_qconn *qc)
{
    if (qc->state == QC_ACTIVE)
        heap_set(qc->e, qc, ngtcp2_conn_get_expiry(qc->conn));
}

/* --- dirty list -------------------------------------------------------------------- */

static void dirty_add(fpy3_qconn *qc)
{
    if (qc->dirty)
        return;
    fpy3_engine *e = qc->e;
    qc->dirty = 1;
    qc->dprev = NULL;
    qc->dnext = e->dirty;
    if (e->dirty)
        e->dirty->dprev = qc;
    e->dirty = qc;
}

static void dirty_del(fpy3_qconn *qc)
{
    if (!qc->dirty)
        return;
    if (qc->dprev)
        qc->dprev->dnext = qc->dnext;
    else
        qc->e->dirty = qc->dnext;
    if (qc->dnext)
        qc->dnext->dprev = qc->dprev;
    qc->dirty = 0;
    qc->dnext = qc->dprev = NULL;
}

/* --- send batch -------------------------------------------------------------------- */

static int is_v4mapped(const struct sockaddr *sa)
{
    return sa->sa_family == AF_INET6 &&
           IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)sa)->sin6_addr);
}

/* Fills msg i's header and control data: source address, GSO segment size, ECN. */
static void tx_fill(fpy3_engine *e, uint32_t i, uint8_t *data, size_t len, size_t seg,
                    const ngtcp2_path *path, uint32_t ecn)
{
    struct msghdr *h = &e->txmsg[i].msg_hdr;
    memcpy(&e->txaddr[i], path->remote.addr, path->remote.addrlen);
    e->txiov[i].iov_base = data;
    e->txiov[i].iov_len = len;
    h->msg_name = &e->txaddr[i];
    h->msg_namelen = path->remote.addrlen;
    h->msg_iov = &e->txiov[i];
    h->msg_iovlen = 1;
    h->msg_control = e->txctrl[i];
    h->msg_controllen = sizeof(e->txctrl[i]);
    h->msg_flags = 0;
    memset(e->txctrl[i], 0, sizeof(e->txctrl[i]));
    struct cmsghdr *cm = CMSG_FIRSTHDR(h);
    size_t clen = 0;
    const struct sockaddr *la = path->local.addr;
    if (la && la->sa_family == AF_INET) {
        struct in_pktinfo pi = {.ipi_spec_dst = ((const struct sockaddr_in *)la)->sin_addr};
        cm->cmsg_level = IPPROTO_IP;
        cm->cmsg_type = IP_PKTINFO;
        cm->cmsg_len = CMSG_LEN(sizeof(pi));
        memcpy(CMSG_DATA(cm), &pi, sizeof(pi));
        clen += CMSG_SPACE(sizeof(pi));
        cm = CMSG_NXTHDR(h, cm);
    } else if (la && la->sa_family == AF_INET6) {
        struct in6_pktinfo pi = {.ipi6_addr = ((const struct sockaddr_in6 *)la)->sin6_addr};
        cm->cmsg_level = IPPROTO_IPV6;
        cm->cmsg_type = IPV6_PKTINFO;
        cm->cmsg_len = CMSG_LEN(sizeof(pi));
        memcpy(CMSG_DATA(cm), &pi, sizeof(pi));
        clen += CMSG_SPACE(sizeof(pi));
        cm = CMSG_NXTHDR(h, cm);
    }
    if (len > seg) {
        uint16_t n = (uint16_t)seg;
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(n));
        memcpy(CMSG_DATA(cm), &n, sizeof(n));
        clen += CMSG_SPACE(sizeof(n));
        cm = CMSG_NXTHDR(h, cm);
    }
    if (ecn && !e->no_ecn) {
        int v = (int)ecn;
        /* v4-mapped peers go out through the IPv4 stack, which reads IP_TOS. */
        int v6 = path->remote.addr->sa_family == AF_INET6 && !is_v4mapped(path->remote.addr);
        cm->cmsg_level = v6 ? IPPROTO_IPV6 : IPPROTO_IP;
        cm->cmsg_type = v6 ? IPV6_TCLASS : IP_TOS;
        cm->cmsg_len = CMSG_LEN(sizeof(v));
        memcpy(CMSG_DATA(cm), &v, sizeof(v));
        clen += CMSG_SPACE(sizeof(v));
    }
    h->msg_controllen = clen;
    if (!clen)
        h->msg_control = NULL;
    e->txseg[i] = (uint16_t)seg;
    e->txecn[i] = (uint8_t)ecn;
}

/* sendmsg one packet at a time (GSO refused or ECN refused). */
static int tx_send_split(fpy3_engine *e, uint32_t i)
{
    struct msghdr *h = &e->txmsg[i].msg_hdr;
    uint8_t *p = e->txiov[i].iov_base;
    size_t left = e->txiov[i].iov_len, seg = e->txseg[i];
    ngtcp2_path path = {0};
    /* Rebuild the msg per packet without GSO; path data is still in txaddr/txctrl. */
    struct sockaddr_storage remote = e->txaddr[i];
    struct sockaddr_storage local = {0};
    struct cmsghdr *cm;
    for (cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm)) {
        if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            struct sockaddr_in *sin = (struct sockaddr_in *)&local;
            sin->sin_family = AF_INET;
            sin->sin_addr = pi.ipi_spec_dst;
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_PKTINFO) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&local;
            sin6->sin6_family = AF_INET6;
            sin6->sin6_addr = pi.ipi6_addr;
        }
    }
    path.remote.addr = (struct sockaddr *)&remote;
    path.remote.addrlen = h->msg_namelen;
    path.local.addr = local.ss_family ? (struct sockaddr *)&local : NULL;
    uint32_t ecn = e->txecn[i];
    while (left) {
        size_t n = left < seg ? left : seg;
        tx_fill(e, i, p, n, n, &path, ecn);
        ssize_t rv;
        do
            rv = sendmsg(e->fd, &e->txmsg[i].msg_hdr, 0);
        while (rv < 0 && errno == EINTR);
        if (rv < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* Keep the unsent rest as msg i. */
            tx_fill(e, i, p, left, seg, &path, ecn);
            return -1;
        }
        p += n;
        left -= n;
    }
    return 0;
}

/* Sends queued msgs. Returns 0 when all went (or were dropped), -1 when blocked. */
static int tx_send(fpy3_engine *e)
{
    while (e->ntx_sent < e->ntx) {
        int rv = sendmmsg(e->fd, &e->txmsg[e->ntx_sent], e->ntx - e->ntx_sent, 0);
        if (rv > 0) {
            e->ntx_sent += (uint32_t)rv;
            continue;
        }
        if (rv < 0 && errno == EINTR)
            continue;
        if (rv < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            e->blocked = 1;
            return -1;
        }
        uint32_t i = e->ntx_sent;
        if (rv < 0 && errno == EIO && e->gso && e->txiov[i].iov_len > e->txseg[i]) {
            e->gso = 0; /* the device cannot segment: one packet per send from now on */
            if (tx_send_split(e, i) < 0) {
                e->blocked = 1;
                return -1;
            }
        } else if (rv < 0 && errno == EINVAL && !e->no_ecn && e->txecn[i]) {
            e->no_ecn = 1; /* a kernel refusing the TOS cmsg: send without ECN */
            if (tx_send_split(e, i) < 0) {
                e->blocked = 1;
                return -1;
            }
        }
        /* Any other error drops this msg, as the network could have. */
        e->ntx_sent++;
    }
    e->ntx = e->ntx_sent = 0;
    e->txlen = 0;
    e->blocked = 0;
    return 0;
}

/* Room for `need` bytes and a GSO run's worth of msgs; NULL while blocked. */
static uint8_t *tx_reserve(fpy3_engine *e, size_t need)
{
    if (e->blocked)
        return NULL;
    if (e->txlen + need > TX_BUFSZ || e->ntx + GSO_MAX_SEGS + 1 > TX_MAXMSG) {
        if (tx_send(e) < 0)
            return NULL;
    }
    return e->txbuf + e->txlen;
}

/* Queues len bytes already written at txbuf + txlen: one msg (GSO) or one per packet. */
static void tx_commit(fpy3_engine *e, size_t len, size_t seg, const ngtcp2_path *path,
                      uint32_t ecn)
{
    uint8_t *p = e->txbuf + e->txlen;
    e->txlen += len;
    if (e->gso || len <= seg) {
        tx_fill(e, e->ntx++, p, len, seg, path, ecn);
        return;
    }
    while (len) {
        size_t n = len < seg ? len : seg;
        tx_fill(e, e->ntx++, p, n, n, path, ecn);
        p += n;
        len -= n;
    }
}

/* A packet not tied to a connection (version negotiation, Retry, reset, close). */
static uint8_t *oneoff_buf(fpy3_engine *e) { return tx_reserve(e, ONEOFF_MAX); }

static void oneoff_send(fpy3_engine *e, size_t len, const ngtcp2_path *path)
{
    if (len > 0)
        tx_commit(e, len, len, path, 0);
}

/* --- connection ids ---------------------------------------------------------------- */

static void make_cid(fpy3_engine *e, ngtcp2_cid *cid)
{
    cid->datalen = SCID_LEN;
    rand_bytes(cid->data, SCID_LEN);
    uint32_t w = htonl(e->cfg.worker_id);
    memcpy(cid->data + 1, &w, 4);
}

/* --- ngtcp2 callbacks -------------------------------------------------------------- */

static ngtcp2_conn *get_conn(ngtcp2_crypto_conn_ref *ref)
{
    return ((fpy3_qconn *)ref->user_data)->conn;
}

static void cb_rand(uint8_t *dest, size_t len, const ngtcp2_rand_ctx *ctx)
{
    (void)ctx;
    rand_bytes(dest, len);
}

static int cb_new_cid(ngtcp2_conn *conn, ngtcp2_cid *cid, uint8_t *token, size_t cidlen,
                      void *ud)
{
    fpy3_qconn *qc = ud;
    fpy3_engine *e = qc->e;
    (void)conn;
    (void)cidlen; /* always SCID_LEN: it is what the connection was created with */
    do
        make_cid(e, cid);
    while (cid_find(&e->map, cid->data, cid->datalen));
    if (ngtcp2_crypto_generate_stateless_reset_token(token, e->cfg.static_secret,
                                                     sizeof(e->cfg.static_secret), cid) != 0)
        return NGTCP2_ERR_CALLBACK_FAILURE;
    if (cid_put(&e->map, cid, qc) < 0)
        return NGTCP2_ERR_CALLBACK_FAILURE;
    return 0;
}

static int cb_remove_cid(ngtcp2_conn *conn, const ngtcp2_cid *cid, void *ud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    cid_del(&qc->e->map, cid, qc);
    return 0;
}

static int app_fail(fpy3_qconn *qc)
{
    (void)qc;
    return NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_recv_tx_key(ngtcp2_conn *conn, ngtcp2_encryption_level level, void *ud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    if (level != NGTCP2_ENCRYPTION_LEVEL_1RTT || qc->ac)
        return 0;
    qc->ac = qc->e->cb.conn_open(qc->e->app, qc);
    return qc->ac ? 0 : app_fail(qc);
}

static int cb_recv_stream_data(ngtcp2_conn *conn, uint32_t flags, int64_t sid, uint64_t offset,
                               const uint8_t *data, size_t len, void *ud, void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)offset;
    (void)sud;
    if (!qc->ac) {
        ng_extend(qc, sid, len);
        return 0;
    }
    if (qc->e->cb.recv(qc->ac, sid, data, len, !!(flags & NGTCP2_STREAM_DATA_FLAG_FIN)) < 0)
        return app_fail(qc);
    return 0;
}

static int cb_acked(ngtcp2_conn *conn, int64_t sid, uint64_t offset, uint64_t len, void *ud,
                    void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)offset;
    (void)sud;
    if (qc->ac && qc->e->cb.acked(qc->ac, sid, len) < 0)
        return app_fail(qc);
    return 0;
}

static int cb_stream_close(ngtcp2_conn *conn, uint32_t flags, int64_t sid, uint64_t app_error,
                           void *ud, void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)sud;
    if (!(flags & NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET))
        app_error = 0; /* 0: closed without a code */
    if (qc->ac && qc->e->cb.stream_close(qc->ac, sid, app_error) < 0)
        return app_fail(qc);
    return 0;
}

static int cb_stream_reset(ngtcp2_conn *conn, int64_t sid, uint64_t final_size,
                           uint64_t app_error, void *ud, void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)final_size;
    (void)sud;
    if (qc->ac && qc->e->cb.peer_reset(qc->ac, sid, app_error) < 0)
        return app_fail(qc);
    return 0;
}

/* ngtcp2 calls this when *we* stop reading (STOP_SENDING), not for the peer's. */
static int cb_stop_sending(ngtcp2_conn *conn, int64_t sid, uint64_t app_error, void *ud,
                           void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)app_error;
    (void)sud;
    if (qc->ac && qc->e->cb.stop_reading(qc->ac, sid) < 0)
        return app_fail(qc);
    return 0;
}

static int cb_extend_max_remote_bidi(ngtcp2_conn *conn, uint64_t max_streams, void *ud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    if (qc->ac)
        qc->e->cb.max_streams(qc->ac, max_streams);
    return 0;
}

static int cb_extend_max_stream_data(ngtcp2_conn *conn, int64_t sid, uint64_t max_data,
                                     void *ud, void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)max_data;
    (void)sud;
    if (qc->ac && qc->e->cb.unblocked(qc->ac, sid) < 0)
        return app_fail(qc);
    return 0;
}

static void cb_qlog(void *ud, uint32_t flags, const void *data, size_t len)
{
    fpy3_qconn *qc = ud;
    if (!qc->qlog)
        return;
    fwrite(data, 1, len, qc->qlog);
    if (flags & NGTCP2_QLOG_WRITE_FLAG_FIN)
        fflush(qc->qlog);
}

/* GnuTLS hook: the offered ALPN must have matched ours (GNUTLS_ALPN_MANDATORY
 * already aborts on a mismatch; this also refuses clients that sent none). */
static int alpn_hook(gnutls_session_t s, unsigned int htype, unsigned when, unsigned int incoming,
                     const gnutls_datum_t *msg)
{
    (void)htype;
    (void)when;
    (void)incoming;
    (void)msg;
    gnutls_datum_t sel;
    ngtcp2_crypto_conn_ref *ref = gnutls_session_get_ptr(s);
    fpy3_qconn *qc = ref->user_data;
    if (gnutls_alpn_get_selected_protocol(s, &sel) != 0)
        return GNUTLS_E_NO_APPLICATION_PROTOCOL;
    if (sel.size != qc->e->alpnlen || memcmp(sel.data, qc->e->alpn, sel.size) != 0)
        return GNUTLS_E_NO_APPLICATION_PROTOCOL;
    return 0;
}

static const ngtcp2_callbacks callbacks = {
    .recv_client_initial = ngtcp2_crypto_recv_client_initial_cb,
    .recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb,
    .encrypt = ngtcp2_crypto_encrypt_cb,
    .decrypt = ngtcp2_crypto_decrypt_cb,
    .hp_mask = ngtcp2_crypto_hp_mask_cb,
    .recv_stream_data = cb_recv_stream_data,
    .acked_stream_data_offset = cb_acked,
    .stream_close = cb_stream_close,
    .rand = cb_rand,
    .get_new_connection_id = cb_new_cid,
    .remove_connection_id = cb_remove_cid,
    .update_key = ngtcp2_crypto_update_key_cb,
    .stream_reset = cb_stream_reset,
    .extend_max_remote_streams_bidi = cb_extend_max_remote_bidi,
    .extend_max_stream_data = cb_extend_max_stream_data,
    .delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb,
    .delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb,
    .get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb,
    .stream_stop_sending = cb_stop_sending,
    .version_negotiation = ngtcp2_crypto_version_negotiation_cb,
    .recv_tx_key = cb_recv_tx_key,
};

/* --- connection lifecycle ---------------------------------------------------------- */

static int slot_alloc(fpy3_engine *e, fpy3_qconn *qc)
{
    uint32_t s;
    if (e->nfree) {
        s = e->freeslots[--e->nfree];
    } else {
        if (e->nslots == e->slotcap) {
            uint32_t ncap = e->slotcap ? e->slotcap * 2 : 64;
            if (ncap > (1u << 24))
                return -1;
            fpy3_qconn **ns = realloc(e->slots, ncap * sizeof(*ns));
            if (!ns)
                return -1;
            e->slots = ns;
            uint32_t *nf = realloc(e->freeslots, ncap * sizeof(*nf));
            if (!nf)
                return -1;
            e->freeslots = nf;
            e->slotcap = ncap;
        }
        s = e->nslots++;
    }
    e->slots[s] = qc;
    qc->slot = s;
    qc->handle = (++e->counter << 24) | s;
    return 0;
}

static void app_detach(fpy3_qconn *qc)
{
    void *ac = qc->ac;
    if (!ac)
        return;
    qc->ac = NULL; /* engine calls made from conn_close see no app and do nothing */
    qc->e->cb.conn_close(ac);
}

static void conn_delete(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->e;
    app_detach(qc);
    heap_remove(e, qc);
    dirty_del(qc);
    if (qc->odcid.datalen)
        cid_del(&e->map, &qc->odcid, qc);
    if (qc->conn) {
        size_t n = ngtcp2_conn_get_scid(qc->conn, NULL);
        ngtcp2_cid ids[16], *p = n <= 16 ? ids : malloc(n * sizeof(*p));
        if (p) {
            ngtcp2_conn_get_scid(qc->conn, p);
            for (size_t i = 0; i < n; i++)
                cid_del(&e->map, &p[i], qc);
            if (p != ids)
                free(p);
        }
        ngtcp2_conn_del(qc->conn);
    }
    if (qc->tls)
        gnutls_deinit(qc->tls);
    if (qc->qlog)
        fclose(qc->qlog);
    free(qc->closebuf);
    e->slots[qc->slot] = NULL;
    e->freeslots[e->nfree++] = qc->slot;
    e->nconns--;
    if (qc->state == QC_ACTIVE)
        e->nactive--;
    free(qc);
}

static ngtcp2_duration close_wait(fpy3_qconn *qc) { return 3 * ngtcp2_conn_get_pto(qc->conn); }

static void start_draining(fpy3_qconn *qc)
{
    if (qc->state == QC_ACTIVE)
        qc->e->nactive--;
    qc->state = QC_DRAINING;
    dirty_del(qc);
    app_detach(qc);
    heap_set(qc->e, qc, qc->e->now + close_wait(qc));
}

/* Sends CONNECTION_CLOSE with qc->ccerr and enters the closing period. */
static void start_closing(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->e;
    if (qc->state != QC_ACTIVE)
        return;
    if (qc->ccerr.type == NGTCP2_CCERR_TYPE_IDLE_CLOSE) {
        conn_delete(qc);
        return;
    }
    if (ngtcp2_conn_in_draining_period(qc->conn)) {
        start_draining(qc);
        return;
    }
    ngtcp2_path_storage ps;
    ngtcp2_pkt_info pi;
    ngtcp2_path_storage_zero(&ps);
    qc->closebuf = malloc(NGTCP2_MAX_UDP_PAYLOAD_SIZE);
    ngtcp2_ssize n = qc->closebuf ? ngtcp2_conn_write_connection_close(
                                        qc->conn, &ps.path, &pi, qc->closebuf,
                                        NGTCP2_MAX_UDP_PAYLOAD_SIZE, &qc->ccerr, e->now)
                                  : -1;
    if (n <= 0) {
        conn_delete(qc);
        return;
    }
    qc->closelen = (size_t)n;
    qc->state = QC_CLOSING;
    e->nactive--;
    dirty_del(qc);
    app_detach(qc);
    heap_set(e, qc, e->now + close_wait(qc));
    uint8_t *buf = tx_reserve(e, qc->closelen);
    if (buf) {
        memcpy(buf, qc->closebuf, qc->closelen);
        tx_commit(e, qc->closelen, qc->closelen, &ps.path, 0);
    }
}

static void fail_liberr(fpy3_qconn *qc, int rv)
{
    if (!qc->err_set) {
        if (rv == NGTCP2_ERR_CRYPTO)
            ngtcp2_ccerr_set_tls_alert(&qc->ccerr, ngtcp2_conn_get_tls_alert(qc->conn), NULL, 0);
        else
            ngtcp2_ccerr_set_liberr(&qc->ccerr, rv, NULL, 0);
    }
    start_closing(qc);
}

/* In the closing period every peer packet gets the close again, backing off
 * (1st, 2nd, 4th, 8th ... packet) so we cannot be used to amplify. */
static void resend_close(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->e;
    uint32_t k = ++qc->close_rx;
    if (k & (k - 1))
        return;
    uint8_t *buf = tx_reserve(e, qc->closelen);
    if (!buf)
        return;
    memcpy(buf, qc->closebuf, qc->closelen);
    tx_commit(e, qc->closelen, qc->closelen, ngtcp2_conn_get_path(qc->conn), 0);
}

static fpy3_qconn *conn_new(fpy3_engine *e, const ngtcp2_pkt_hd *hd, const ngtcp2_cid *ocid,
                            ngtcp2_token_type token_type, const ngtcp2_path *path)
{
    fpy3_qconn *qc = calloc(1, sizeof(*qc));
    if (!qc)
        return NULL;
    qc->e = e;
    qc->heap_idx = NO_HEAP;
    qc->expiry = UINT64_MAX;
    qc->ref.get_conn = get_conn;
    qc->ref.user_data = qc;
    ngtcp2_ccerr_default(&qc->ccerr);
    if (slot_alloc(e, qc) < 0) {
        free(qc);
        return NULL;
    }
    e->nconns++;
    e->nactive++;

    ngtcp2_cid scid;
    do
        make_cid(e, &scid);
    while (cid_find(&e->map, scid.data, scid.datalen));

    ngtcp2_settings settings;
    ngtcp2_settings_default(&settings);
    settings.initial_ts = e->now;
    settings.max_tx_udp_payload_size = e->cfg.max_udp_payload;
    settings.token = hd->token;
    settings.tokenlen = hd->tokenlen;
    settings.token_type = token_type;
    settings.handshake_timeout = 10 * NGTCP2_SECONDS;
    if (e->qlog_dir) {
        char path_buf[4096];
        int off = snprintf(path_buf, sizeof(path_buf), "%s/", e->qlog_dir);
        for (size_t i = 0; i < scid.datalen && off > 0 && (size_t)off + 3 < sizeof(path_buf); i++)
            off += snprintf(path_buf + off, sizeof(path_buf) - (size_t)off, "%02x", scid.data[i]);
        if (off > 0 && (size_t)off + 7 < sizeof(path_buf)) {
            memcpy(path_buf + off, ".sqlog", 7);
            qc->qlog = fopen(path_buf, "w");
        }
        if (qc->qlog)
            settings.qlog_write = cb_qlog;
    }

    ngtcp2_transport_params params;
    ngtcp2_transport_params_default(&params);
    params.initial_max_stream_data_bidi_local = e->cfg.initial_max_stream_data;
    params.initial_max_stream_data_bidi_remote = e->cfg.initial_max_stream_data;
    params.initial_max_stream_data_uni = e->cfg.initial_max_stream_data;
    params.initial_max_data = e->cfg.initial_max_data;
    params.initial_max_streams_bidi = e->cfg.max_streams_bidi;
    params.initial_max_streams_uni = e->cfg.max_streams_uni;
    params.max_idle_timeout = e->cfg.idle_timeout_ms * NGTCP2_MILLISECONDS;
    params.max_udp_payload_size = RX_BUFSZ;
    params.active_connection_id_limit = 7;
    params.stateless_reset_token_present = 1;
    if (ocid) {
        params.original_dcid = *ocid;
        params.retry_scid = hd->dcid;
        params.retry_scid_present = 1;
    } else {
        params.original_dcid = hd->dcid;
    }
    params.original_dcid_present = 1;
    if (ngtcp2_crypto_generate_stateless_reset_token(params.stateless_reset_token,
                                                     e->cfg.static_secret,
                                                     sizeof(e->cfg.static_secret), &scid) != 0)
        goto fail;

    if (ngtcp2_conn_server_new(&qc->conn, &hd->scid, &scid, path, hd->version, &callbacks,
                               &settings, &params, NULL, qc) != 0)
        goto fail;

    if (gnutls_init(&qc->tls, GNUTLS_SERVER | GNUTLS_NO_END_OF_EARLY_DATA) != 0) {
        qc->tls = NULL;
        goto fail;
    }
    gnutls_datum_t alpn = {.data = e->alpn, .size = (unsigned)e->alpnlen};
    if (gnutls_priority_set(qc->tls, e->prio) != 0 ||
        ngtcp2_crypto_gnutls_configure_server_session(qc->tls) != 0 ||
        gnutls_credentials_set(qc->tls, GNUTLS_CRD_CERTIFICATE, e->cred) != 0 ||
        gnutls_alpn_set_protocols(qc->tls, &alpn, 1,
                                  GNUTLS_ALPN_MANDATORY | GNUTLS_ALPN_SERVER_PRECEDENCE) != 0)
        goto fail;
    gnutls_handshake_set_hook_function(qc->tls, GNUTLS_HANDSHAKE_CLIENT_HELLO, GNUTLS_HOOK_POST,
                                       alpn_hook);
    gnutls_session_set_ptr(qc->tls, &qc->ref);
    ngtcp2_conn_set_tls_native_handle(qc->conn, qc->tls);

    qc->odcid = hd->dcid;
    if (cid_put(&e->map, &hd->dcid, qc) < 0 || cid_put(&e->map, &scid, qc) < 0)
        goto fail;
    return qc;
fail:
    conn_delete(qc);
    return NULL;
}

/* --- receive path ------------------------------------------------------------------ */

static void send_version_negotiation(fpy3_engine *e, const ngtcp2_version_cid *vc,
                                     const ngtcp2_path *path)
{
    uint8_t *buf = oneoff_buf(e);
    if (!buf)
        return;
    uint8_t unused;
    rand_bytes(&unused, 1);
    /* A reserved version first (greasing), then the one we speak. */
    uint32_t sv[2];
    rand_bytes(&sv[0], sizeof(sv[0]));
    sv[0] = (sv[0] & 0xf0f0f0f0u) | 0x0a0a0a0au;
    sv[1] = NGTCP2_PROTO_VER_V1;
    ngtcp2_ssize n = ngtcp2_pkt_write_version_negotiation(buf, ONEOFF_MAX, unused, vc->scid,
                                                          vc->scidlen, vc->dcid, vc->dcidlen,
                                                          sv, 2);
    if (n > 0)
        oneoff_send(e, (size_t)n, path);
}

static void send_retry(fpy3_engine *e, const ngtcp2_pkt_hd *hd, const ngtcp2_path *path,
                       size_t pktlen)
{
    uint8_t token[NGTCP2_CRYPTO_MAX_RETRY_TOKENLEN2];
    ngtcp2_cid scid;
    make_cid(e, &scid);
    ngtcp2_ssize tlen = ngtcp2_crypto_generate_retry_token2(
        token, e->cfg.static_secret, sizeof(e->cfg.static_secret), hd->version,
        path->remote.addr, path->remote.addrlen, &scid, &hd->dcid, wall_ns());
    if (tlen < 0)
        return;
    uint8_t *buf = oneoff_buf(e);
    if (!buf)
        return;
    /* Never more than 3x what the client sent (anti-amplification). */
    size_t max = pktlen * 3 < ONEOFF_MAX ? pktlen * 3 : ONEOFF_MAX;
    ngtcp2_ssize n = ngtcp2_crypto_write_retry(buf, max, hd->version, &hd->scid, &scid, &hd->dcid,
                                               token, (size_t)tlen);
    if (n > 0)
        oneoff_send(e, (size_t)n, path);
}

static void send_stateless_close(fpy3_engine *e, const ngtcp2_pkt_hd *hd,
                                 const ngtcp2_path *path, uint64_t code)
{
    uint8_t *buf = oneoff_buf(e);
    if (!buf)
        return;
    ngtcp2_ssize n = ngtcp2_crypto_write_connection_close(buf, ONEOFF_MAX, hd->version, &hd->scid,
                                                          &hd->dcid, code, NULL, 0);
    if (n > 0)
        oneoff_send(e, (size_t)n, path);
}

static void send_stateless_reset(fpy3_engine *e, size_t pktlen, const uint8_t *dcid,
                                 size_t dcidlen, const ngtcp2_path *path)
{
    if (e->now - e->sr_refill >= NGTCP2_SECONDS) {
        e->sr_tokens = SR_PER_SEC;
        e->sr_refill = e->now;
    }
    if (!e->sr_tokens)
        return;
    e->sr_tokens--;
    ngtcp2_cid cid;
    ngtcp2_cid_init(&cid, dcid, dcidlen);
    uint8_t token[NGTCP2_STATELESS_RESET_TOKENLEN];
    if (ngtcp2_crypto_generate_stateless_reset_token(token, e->cfg.static_secret,
                                                     sizeof(e->cfg.static_secret), &cid) != 0)
        return;
    /* Smaller than the packet that triggered it, so two servers cannot loop. */
    size_t randlen = NGTCP2_MAX_CIDLEN + 22 - NGTCP2_STATELESS_RESET_TOKENLEN;
    if (pktlen <= 43)
        randlen = pktlen - NGTCP2_STATELESS_RESET_TOKENLEN - 1;
    uint8_t rnd[NGTCP2_MAX_CIDLEN + 22];
    rand_bytes(rnd, randlen);
    uint8_t *buf = oneoff_buf(e);
    if (!buf)
        return;
    ngtcp2_ssize n = ngtcp2_pkt_write_stateless_reset(buf, ONEOFF_MAX, token, rnd, randlen);
    if (n > 0)
        oneoff_send(e, (size_t)n, path);
}

/* Feeds one packet to a connection. */
static void conn_read(fpy3_qconn *qc, const ngtcp2_path *path, const ngtcp2_pkt_info *pi,
                      const uint8_t *pkt, size_t len)
{
    int rv = ngtcp2_conn_read_pkt(qc->conn, path, pi, pkt, len, qc->e->now);
    if (rv == 0) {
        dirty_add(qc);
        update_timer(qc);
        return;
    }
    switch (rv) {
    case NGTCP2_ERR_DRAINING:
        start_draining(qc);
        return;
    case NGTCP2_ERR_DROP_CONN:
        conn_delete(qc);
        return;
    default:
        fail_liberr(qc, rv);
    }
}

static void accept_conn(fpy3_engine *e, const uint8_t *pkt, size_t len, const ngtcp2_path *path,
                        const ngtcp2_pkt_info *pi)
{
    ngtcp2_pkt_hd hd;
    if (ngtcp2_accept(&hd, pkt, len) != 0)
        return;
    if (!e->accepting) {
        send_stateless_close(e, &hd, path, NGTCP2_CONNECTION_REFUSED);
        return;
    }
    ngtcp2_cid ocid, *pocid = NULL;
    ngtcp2_token_type ttype = NGTCP2_TOKEN_TYPE_UNKNOWN;
    if (hd.tokenlen && hd.token[0] == NGTCP2_CRYPTO_TOKEN_MAGIC_RETRY2) {
        int rv = ngtcp2_crypto_verify_retry_token2(
            &ocid, hd.token, hd.tokenlen, e->cfg.static_secret, sizeof(e->cfg.static_secret),
            hd.version, path->remote.addr, path->remote.addrlen, &hd.dcid, 10 * NGTCP2_SECONDS,
            wall_ns());
        if (rv == 0) {
            pocid = &ocid;
            ttype = NGTCP2_TOKEN_TYPE_RETRY;
        } else if (rv == NGTCP2_CRYPTO_ERR_VERIFY_TOKEN) {
            send_stateless_close(e, &hd, path, NGTCP2_INVALID_TOKEN);
            return;
        }
    }
    if (!pocid) {
        /* We never send NEW_TOKEN, so any other token is unknown to us: ignore it. */
        hd.token = NULL;
        hd.tokenlen = 0;
        if (e->cfg.retry) {
            send_retry(e, &hd, path, len);
            return;
        }
    }
    fpy3_qconn *qc = conn_new(e, &hd, pocid, ttype, path);
    if (!qc)
        return;
    int rv = ngtcp2_conn_read_pkt(qc->conn, path, pi, pkt, len, e->now);
    if (rv == 0) {
        dirty_add(qc);
        update_timer(qc);
        return;
    }
    if (rv == NGTCP2_ERR_RETRY) {
        send_retry(e, &hd, path, len);
        conn_delete(qc);
        return;
    }
    if (rv == NGTCP2_ERR_DROP_CONN || rv == NGTCP2_ERR_DRAINING) {
        conn_delete(qc);
        return;
    }
    fail_liberr(qc, rv);
}

static void handle_datagram(fpy3_engine *e, const uint8_t *pkt, size_t len,
                            const ngtcp2_path *path, const ngtcp2_pkt_info *pi)
{
    ngtcp2_version_cid vc;
    int rv = ngtcp2_pkt_decode_version_cid(&vc, pkt, len, SCID_LEN);
    if (rv == NGTCP2_ERR_VERSION_NEGOTIATION) {
        send_version_negotiation(e, &vc, path);
        return;
    }
    if (rv != 0)
        return;
    fpy3_qconn *qc = cid_find(&e->map, vc.dcid, vc.dcidlen);
    if (!qc) {
        if (pkt[0] & 0x80)
            accept_conn(e, pkt, len, path, pi);
        else if (len >= SCID_LEN + 22)
            send_stateless_reset(e, len, vc.dcid, vc.dcidlen, path);
        return;
    }
    if (qc->state == QC_CLOSING) {
        resend_close(qc);
        return;
    }
    if (qc->state == QC_DRAINING)
        return;
    conn_read(qc, path, pi, pkt, len);
}

/* Destination address and ECN bits from a received message's control data. */
static void parse_cmsgs(fpy3_engine *e, struct msghdr *h, struct sockaddr_storage *local,
                        socklen_t *locallen, uint32_t *ecn)
{
    *ecn = 0;
    memcpy(local, &e->bound.addr, e->bound.len);
    *locallen = e->bound.len;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm)) {
        if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            if (e->family == AF_INET) {
                struct sockaddr_in *sin = (struct sockaddr_in *)local;
                sin->sin_addr = pi.ipi_addr;
            } else {
                /* IPv4 on a dual-stack socket: the v4-mapped form, like the peer's. */
                struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)local;
                memset(&sin6->sin6_addr, 0, sizeof(sin6->sin6_addr));
                sin6->sin6_addr.s6_addr[10] = sin6->sin6_addr.s6_addr[11] = 0xff;
                memcpy(&sin6->sin6_addr.s6_addr[12], &pi.ipi_addr, 4);
            }
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_PKTINFO) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)local;
            sin6->sin6_addr = pi.ipi6_addr;
            if (IN6_IS_ADDR_LINKLOCAL(&pi.ipi6_addr))
                sin6->sin6_scope_id = pi.ipi6_ifindex;
        } else if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_TOS) {
            *ecn = *(uint8_t *)CMSG_DATA(cm) & 0x3; /* a byte for IPv4 */
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_TCLASS) {
            int v;
            memcpy(&v, CMSG_DATA(cm), sizeof(v));
            *ecn = (uint32_t)v & 0x3;
        }
    }
}

static void write_dirty(fpy3_engine *e, int honor_defer)
{
    /* Deferred connections are set aside and put back after the pass. */
    fpy3_qconn *kept = NULL;
    while (e->dirty && !e->blocked) {
        fpy3_qconn *qc = e->dirty;
        dirty_del(qc);
        if (honor_defer && qc->defer) {
            qc->dnext = kept;
            kept = qc;
            continue;
        }
        qc->defer = 0;
        conn_write(qc);
    }
    while (kept) {
        fpy3_qconn *qc = kept;
        kept = qc->dnext;
        qc->dnext = NULL;
        dirty_add(qc);
    }
    if (e->ntx > e->ntx_sent)
        tx_send(e);
}

/* --- write path -------------------------------------------------------------------- */

/* Writes one burst (at most the send quantum) of qc's packets into the send batch. */
static void conn_write(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->e;
    ngtcp2_conn *c = qc->conn;
    if (qc->state != QC_ACTIVE)
        return;
    size_t max_udp = ngtcp2_conn_get_max_tx_udp_payload_size(c);
    size_t path_max = ngtcp2_conn_get_path_max_tx_udp_payload_size(c);
    size_t quantum = ngtcp2_conn_get_send_quantum(c);
    if (quantum > GSO_MAX_BYTES)
        quantum = GSO_MAX_BYTES;
    if (quantum < path_max)
        quantum = path_max;
    uint8_t *buf = tx_reserve(e, quantum);
    if (!buf) {
        dirty_add(qc); /* blocked: try again on the next flush */
        return;
    }
    ngtcp2_path_storage ps, prev;
    ngtcp2_path_storage_zero(&ps);
    ngtcp2_path_storage_zero(&prev);
    ngtcp2_pkt_info pi;
    uint32_t prev_ecn = 0;
    size_t off = 0, seg = 0, nseg = 0;
    fpy3_vec vec[16];
    ngtcp2_tstamp ts = e->now;

    for (;;) {
        int64_t sid = -1;
        int fin = 0;
        long nvec = 0;
        if (qc->ac && ngtcp2_conn_get_max_data_left(c)) {
            nvec = e->cb.pull(qc->ac, &sid, &fin, vec, 16);
            if (nvec < 0) {
                if (!qc->err_set)
                    ngtcp2_ccerr_set_liberr(&qc->ccerr, NGTCP2_ERR_CALLBACK_FAILURE, NULL, 0);
                start_closing(qc);
                return;
            }
        }
        uint32_t flags = NGTCP2_WRITE_STREAM_FLAG_MORE | (fin ? NGTCP2_WRITE_STREAM_FLAG_FIN : 0);
        size_t left = quantum - off;
        size_t buflen = left >= max_udp ? max_udp : path_max;
        if (left < buflen)
            break;
        ngtcp2_ssize ndatalen;
        ngtcp2_ssize n = ngtcp2_conn_writev_stream(c, &ps.path, &pi, buf + off, buflen, &ndatalen,
                                                   flags, sid, (const ngtcp2_vec *)vec,
                                                   (size_t)nvec, ts);
        if (n < 0) {
            switch (n) {
            case NGTCP2_ERR_STREAM_DATA_BLOCKED:
                if (qc->ac)
                    e->cb.blocked(qc->ac, sid);
                continue;
            case NGTCP2_ERR_STREAM_SHUT_WR:
                if (qc->ac)
                    e->cb.shut_wr(qc->ac, sid);
                continue;
            case NGTCP2_ERR_WRITE_MORE:
                if (qc->ac && e->cb.written(qc->ac, sid, (size_t)ndatalen) < 0)
                    goto app_error;
                continue;
            default:
                fail_liberr(qc, (int)n);
                return;
            }
        }
        if (ndatalen >= 0 && qc->ac && e->cb.written(qc->ac, sid, (size_t)ndatalen) < 0)
            goto app_error;
        if (n == 0)
            break;
        if (off == 0) {
            ngtcp2_path_copy(&prev.path, &ps.path);
            prev_ecn = pi.ecn;
            seg = (size_t)n;
            off = (size_t)n;
            nseg = 1;
        } else if (!ngtcp2_path_eq(&prev.path, &ps.path) || prev_ecn != pi.ecn ||
                   (size_t)n > seg) {
            /* This packet cannot join the run: send the run, then it alone. */
            tx_commit(e, off, seg, &prev.path, prev_ecn);
            tx_commit(e, (size_t)n, (size_t)n, &ps.path, pi.ecn);
            off = 0;
            break;
        } else {
            off += (size_t)n;
            nseg++;
        }
        if (quantum - off < path_max || (size_t)n < seg || nseg >= GSO_MAX_SEGS)
            break;
    }
    if (off)
        tx_commit(e, off, seg, &prev.path, prev_ecn);
    ngtcp2_conn_update_pkt_tx_time(c, ts);
    update_timer(qc);
    return;
app_error:
    if (off)
        tx_commit(e, off, seg, &prev.path, prev_ecn);
    if (!qc->err_set)
        ngtcp2_ccerr_set_liberr(&qc->ccerr, NGTCP2_ERR_CALLBACK_FAILURE, NULL, 0);
    start_closing(qc);
}

/* --- public API -------------------------------------------------------------------- */

static int sockopt_on(int fd, int level, int name)
{
    int one = 1;
    return setsockopt(fd, level, name, &one, sizeof(one));
}

static fpy3_engine *ng_new(int fd, const fpy3_engine_config *cfg, const fpy3_engine_app *cb,
                             void *app, char *err, size_t errlen)
{
    fpy3_engine *e = calloc(1, sizeof(*e));
    if (!e) {
        seterr(err, errlen, "out of memory");
        return NULL;
    }
    e->ops = &fpy3_engine_ngtcp2;
    e->fd = fd;
    e->cfg = *cfg;
    e->cb = *cb;
    e->app = app;
    e->accepting = 1;
    e->sr_tokens = SR_PER_SEC;
    e->cfg.cert_file = e->cfg.key_file = e->cfg.qlog_dir = e->cfg.alpn = NULL; /* not kept */
    if (!e->cfg.max_udp_payload)
        e->cfg.max_udp_payload = 1452;
    if (e->cfg.max_udp_payload < 1200)
        e->cfg.max_udp_payload = 1200;
    if (e->cfg.max_udp_payload > RX_BUFSZ)
        e->cfg.max_udp_payload = RX_BUFSZ;
    if (!e->cfg.max_streams_uni)
        e->cfg.max_streams_uni = 3;
    const char *alpn = cfg->alpn ? cfg->alpn : "h3";
    e->alpnlen = strlen(alpn);
    if (e->alpnlen == 0 || e->alpnlen > 255) {
        seterr(err, errlen, "bad ALPN");
        goto fail;
    }
    memcpy(e->alpn, alpn, e->alpnlen);
    if (cfg->qlog_dir && cfg->qlog_dir[0] && !(e->qlog_dir = strdup(cfg->qlog_dir))) {
        seterr(err, errlen, "out of memory");
        goto fail;
    }

    e->bound.len = sizeof(e->bound.addr);
    if (getsockname(fd, (struct sockaddr *)&e->bound.addr, &e->bound.len) < 0) {
        seterr(err, errlen, "getsockname: %s", strerror(errno));
        goto fail;
    }
    e->family = e->bound.addr.ss_family;
    if (e->family != AF_INET && e->family != AF_INET6) {
        seterr(err, errlen, "not an IPv4 or IPv6 socket");
        goto fail;
    }
    int type = 0;
    socklen_t tl = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_DGRAM) {
        seterr(err, errlen, "not a UDP socket");
        goto fail;
    }
    /* Destination address and ECN of every datagram; IPv4 ones too on dual-stack. */
    if (e->family == AF_INET6) {
        sockopt_on(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO);
        sockopt_on(fd, IPPROTO_IPV6, IPV6_RECVTCLASS);
    }
    sockopt_on(fd, IPPROTO_IP, IP_PKTINFO);
    sockopt_on(fd, IPPROTO_IP, IP_RECVTOS);
    int gso = 0;
    socklen_t gl = sizeof(gso);
    e->gso = getsockopt(fd, SOL_UDP, UDP_SEGMENT, &gso, &gl) == 0;
    const char *force = getenv("FPY3_NO_GSO"); /* testing the fallback */
    if (force && force[0] == '1')
        e->gso = 0;

    e->map.cap = 1024;
    e->map.slots = calloc(e->map.cap, sizeof(cid_slot));
    rand_bytes(&e->map.seed, sizeof(e->map.seed));
    e->rxbuf = malloc((size_t)RX_BATCH * RX_BUFSZ);
    e->txbuf = malloc(TX_BUFSZ);
    if (!e->map.slots || !e->rxbuf || !e->txbuf) {
        seterr(err, errlen, "out of memory");
        goto fail;
    }
    for (int i = 0; i < RX_BATCH; i++) {
        e->rxiov[i].iov_base = e->rxbuf + (size_t)i * RX_BUFSZ;
        e->rxiov[i].iov_len = RX_BUFSZ;
        e->rxmsg[i].msg_hdr.msg_iov = &e->rxiov[i];
        e->rxmsg[i].msg_hdr.msg_iovlen = 1;
        e->rxmsg[i].msg_hdr.msg_name = &e->rxaddr[i];
        e->rxmsg[i].msg_hdr.msg_control = e->rxctrl[i];
    }

    int rv = gnutls_certificate_allocate_credentials(&e->cred);
    if (rv == 0)
        rv = gnutls_certificate_set_x509_key_file(e->cred, cfg->cert_file, cfg->key_file,
                                                  GNUTLS_X509_FMT_PEM);
    if (rv < 0) {
        seterr(err, errlen, "loading %s / %s: %s", cfg->cert_file ? cfg->cert_file : "(null)",
               cfg->key_file ? cfg->key_file : "(null)", gnutls_strerror(rv));
        goto fail;
    }
    /* TLS 1.3 only, the AEADs QUIC defines, no middlebox compatibility mode. */
    rv = gnutls_priority_init(&e->prio,
                              "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:"
                              "+AES-256-GCM:+CHACHA20-POLY1305:+AES-128-CCM:-GROUP-ALL:"
                              "+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1:"
                              "+GROUP-SECP521R1:%DISABLE_TLS13_COMPAT_MODE",
                              NULL);
    if (rv < 0) {
        e->prio = NULL;
        seterr(err, errlen, "gnutls priority: %s", gnutls_strerror(rv));
        goto fail;
    }
    e->now = mono_ns();
    return e;
fail:
    ng_free(e);
    return NULL;
}

static void ng_free(fpy3_engine *e)
{
    if (!e)
        return;
    for (uint32_t i = 0; i < e->nslots; i++)
        if (e->slots[i])
            conn_delete(e->slots[i]);
    if (e->cred)
        gnutls_certificate_free_credentials(e->cred);
    if (e->prio)
        gnutls_priority_deinit(e->prio);
    free(e->map.slots);
    free(e->slots);
    free(e->freeslots);
    free(e->heap);
    free(e->expired);
    free(e->rxbuf);
    free(e->txbuf);
    free(e->qlog_dir);
    free(e);
}

static int ng_read(fpy3_engine *e)
{
    int total = 0;
    if (e->blocked)
        tx_send(e);
    for (int round = 0; round < RX_ROUNDS; round++) {
        for (int i = 0; i < RX_BATCH; i++) {
            e->rxmsg[i].msg_hdr.msg_namelen = sizeof(e->rxaddr[i]);
            e->rxmsg[i].msg_hdr.msg_controllen = RX_CTRLSZ;
            e->rxmsg[i].msg_hdr.msg_flags = 0;
        }
        int n = recvmmsg(e->fd, e->rxmsg, RX_BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break; /* EAGAIN, or an error the next readiness will show again */
        }
        e->now = mono_ns();
        for (int i = 0; i < n; i++) {
            struct msghdr *h = &e->rxmsg[i].msg_hdr;
            size_t len = e->rxmsg[i].msg_len;
            if ((h->msg_flags & MSG_TRUNC) || len < 21) /* shorter is never QUIC */
                continue;
            struct sockaddr_storage local;
            socklen_t locallen;
            uint32_t ecn;
            parse_cmsgs(e, h, &local, &locallen, &ecn);
            ngtcp2_pkt_info pi = {.ecn = (uint8_t)ecn};
            ngtcp2_path path = {
                .local = {.addr = (struct sockaddr *)&local, .addrlen = locallen},
                .remote = {.addr = (struct sockaddr *)&e->rxaddr[i], .addrlen = h->msg_namelen},
            };
            handle_datagram(e, e->rxiov[i].iov_base, len, &path, &pi);
            total++;
        }
        if (n < RX_BATCH)
            break;
    }
    e->now = mono_ns();
    write_dirty(e, 1);
    return total;
}

static int ng_expire(fpy3_engine *e)
{
    e->now = mono_ns();
    if (e->blocked)
        tx_send(e);
    /* Take every due connection out first, so each is handled once per call. */
    uint32_t n = 0;
    while (e->heapn && e->heap[0]->expiry <= e->now) {
        fpy3_qconn *qc = e->heap[0];
        heap_remove(e, qc);
        e->expired[n++] = qc;
    }
    for (uint32_t i = 0; i < n; i++) {
        fpy3_qconn *qc = e->expired[i];
        if (qc->state != QC_ACTIVE) {
            conn_delete(qc); /* closing or draining period over */
            continue;
        }
        int rv = ngtcp2_conn_handle_expiry(qc->conn, e->now);
        if (rv == NGTCP2_ERR_IDLE_CLOSE) {
            conn_delete(qc);
            continue;
        }
        if (rv != 0) {
            fail_liberr(qc, rv);
            continue;
        }
        dirty_add(qc);
        update_timer(qc);
    }
    write_dirty(e, 0);
    return (int)n;
}

static int ng_flush(fpy3_engine *e)
{
    e->now = mono_ns();
    if (e->blocked && tx_send(e) < 0)
        return -1;
    write_dirty(e, 0);
    return e->blocked ? -1 : 0;
}

static int64_t ng_next_timeout_ms(fpy3_engine *e)
{
    if (e->dirty && !e->blocked)
        return 0;
    if (!e->heapn)
        return -1;
    ngtcp2_tstamp now = mono_ns(), t = e->heap[0]->expiry;
    if (t <= now)
        return 0;
    return (int64_t)((t - now + NGTCP2_MILLISECONDS - 1) / NGTCP2_MILLISECONDS);
}

static int ng_want_write(fpy3_engine *e) { return e->blocked; }

static void ng_stop_accepting(fpy3_engine *e) { e->accepting = 0; }

static size_t ng_conn_count(fpy3_engine *e) { return e->nactive; }

static void ng_each(fpy3_engine *e, void (*fn)(void *ac, void *arg), void *arg)
{
    for (uint32_t i = 0; i < e->nslots; i++) {
        fpy3_qconn *qc = e->slots[i];
        if (qc && qc->ac)
            fn(qc->ac, arg);
    }
}

static uint64_t ng_conn_handle(fpy3_qconn *qc) { return qc->handle; }

static void *ng_conn_find(fpy3_engine *e, uint64_t handle)
{
    uint32_t s = (uint32_t)(handle & 0xffffff);
    if (s >= e->nslots || !e->slots[s] || e->slots[s]->handle != handle)
        return NULL;
    return e->slots[s]->ac;
}

const struct sockaddr *ng_conn_peer(fpy3_qconn *qc, uint32_t *len)
{
    const ngtcp2_path *p = ngtcp2_conn_get_path(qc->conn);
    *len = (uint32_t)p->remote.addrlen;
    return p->remote.addr;
}

const struct sockaddr *ng_conn_local(fpy3_qconn *qc, uint32_t *len)
{
    const ngtcp2_path *p = ngtcp2_conn_get_path(qc->conn);
    *len = (uint32_t)p->local.addrlen;
    return p->local.addr;
}

static void ng_mark(fpy3_qconn *qc)
{
    if (qc->state == QC_ACTIVE)
        dirty_add(qc);
}

static void ng_defer(fpy3_qconn *qc) { qc->defer = 1; }

static int ng_open_uni(fpy3_qconn *qc, int64_t *sid)
{
    return ngtcp2_conn_open_uni_stream(qc->conn, sid, NULL) == 0 ? 0 : -1;
}

static void ng_extend(fpy3_qconn *qc, int64_t sid, uint64_t n)
{
    if (qc->state != QC_ACTIVE || n == 0)
        return;
    if (sid >= 0)
        ngtcp2_conn_extend_max_stream_offset(qc->conn, sid, n);
    ngtcp2_conn_extend_max_offset(qc->conn, n);
}

static void ng_extend_streams_bidi(fpy3_qconn *qc, uint64_t n)
{
    if (qc->state == QC_ACTIVE)
        ngtcp2_conn_extend_max_streams_bidi(qc->conn, n);
}

static uint64_t ng_max_streams_bidi(fpy3_qconn *qc)
{
    return ngtcp2_conn_get_local_transport_params(qc->conn)->initial_max_streams_bidi;
}

static int ng_shutdown_stream(fpy3_qconn *qc, int64_t sid, uint64_t app_error, int how)
{
    if (qc->state != QC_ACTIVE)
        return -1;
    int rv = 0;
    if ((how & (FPY3_SHUT_RD | FPY3_SHUT_WR)) == (FPY3_SHUT_RD | FPY3_SHUT_WR))
        rv = ngtcp2_conn_shutdown_stream(qc->conn, 0, sid, app_error);
    else if (how & FPY3_SHUT_RD)
        rv = ngtcp2_conn_shutdown_stream_read(qc->conn, 0, sid, app_error);
    else if (how & FPY3_SHUT_WR)
        rv = ngtcp2_conn_shutdown_stream_write(qc->conn, 0, sid, app_error);
    dirty_add(qc);
    return rv == 0 ? 0 : -1;
}

static void ng_conn_error(fpy3_qconn *qc, uint64_t app_error)
{
    if (qc->err_set)
        return;
    ngtcp2_ccerr_set_application_error(&qc->ccerr, app_error, NULL, 0);
    qc->err_set = 1;
}

static void ng_conn_close(fpy3_qconn *qc, uint64_t app_error)
{
    if (qc->state != QC_ACTIVE)
        return;
    ng_conn_error(qc, app_error);
    qc->e->now = mono_ns();
    start_closing(qc);
}

static int ng_fd(fpy3_engine *e) { return e->fd; }

const fpy3_engine_ops fpy3_engine_ngtcp2 = {
    .new = ng_new,
    .free = ng_free,
    .read = ng_read,
    .expire = ng_expire,
    .flush = ng_flush,
    .next_timeout_ms = ng_next_timeout_ms,
    .want_write = ng_want_write,
    .stop_accepting = ng_stop_accepting,
    .conn_count = ng_conn_count,
    .each = ng_each,
    .conn_handle = ng_conn_handle,
    .conn_find = ng_conn_find,
    .conn_peer = ng_conn_peer,
    .conn_local = ng_conn_local,
    .mark = ng_mark,
    .defer = ng_defer,
    .open_uni = ng_open_uni,
    .extend = ng_extend,
    .extend_streams_bidi = ng_extend_streams_bidi,
    .max_streams_bidi = ng_max_streams_bidi,
    .shutdown_stream = ng_shutdown_stream,
    .conn_error = ng_conn_error,
    .conn_close = ng_conn_close,
    .fd = ng_fd,
};
