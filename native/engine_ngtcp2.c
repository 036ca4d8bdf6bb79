/* engine_ngtcp2: the QUIC server engine (engine.h) on ngtcp2 + GnuTLS.
 *
 * One engine per UDP socket, driven from the loop thread: datagrams come and go in
 * batches (udp_batch), connection ids route them (cid_map), and one timer serves all
 * connections (timer_heap, on each connection's ngtcp2 expiry). This file is the
 * ngtcp2 glue between those and the app callbacks.
 *
 * Server connection ids are SCID_LEN bytes: [0] random, [1..4] the worker id
 * (big-endian), the rest random, so a reuseport BPF program can steer on them.
 *
 * Floods: a connection in its handshake costs memory before its client has proved
 * its address. ngtcp2's allocations are counted per connection (a counting ngtcp2_mem),
 * and while too many connections are in their handshake, or they hold too much,
 * new clients get a Retry (stateless) before any state is made for them. Past
 * max_connections an Initial gets CONNECTION_REFUSED, statelessly too. Flow-control
 * windows are not auto-tuned by ngtcp2: the app (h3.c) grows them (fpy3_engine_grow).
 */
#define _GNU_SOURCE
#include "engine.h"

#include <arpa/inet.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <malloc.h>
#include <netinet/in.h>
#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "cid_map.h"
#include "engine_common.h"
#include "timer_heap.h"
#include "udp_batch.h"

_Static_assert(sizeof(fpy3_vec) == sizeof(ngtcp2_vec), "fpy3_vec must match ngtcp2_vec");
_Static_assert(sizeof(ngtcp2_socklen) == sizeof(socklen_t), "ngtcp2_socklen is socklen_t");

#define SCID_LEN 18
#define RX_ROUNDS 16        /* recvmmsg calls per ng_read: bounds one loop turn */
#define ONEOFF_MAX 1500     /* Retry, version negotiation, stateless reset or close */
#define SR_PER_SEC 100      /* stateless resets sent per second at most */
#define CLOSE_ALL_WAIT_MS 200 /* close_all: how long a full socket may hold the closes */
#define REPLAY_SLOTS 4096   /* 0-RTT ClientHellos remembered for the anti-replay window */
#define REPLAY_KEY_MAX 64

enum { QC_ACTIVE, QC_CLOSING, QC_DRAINING };

/* Certificate credentials, shared by the connections whose handshake started with
 * them: a reload makes new ones, the old stay until their last connection is gone. */
typedef struct {
    gnutls_certificate_credentials_t c;
    unsigned refs;
} ng_cred;

/* What GnuTLS's anti-replay asks us to remember: one ClientHello per slot, until it
 * expires (the window). A replayed 0-RTT ClientHello is found and its early data
 * refused; with every slot in use, early data is refused too (never unbounded). */
typedef struct {
    time_t expires;
    uint8_t len;
    uint8_t key[REPLAY_KEY_MAX];
} replay_slot;

/* What a connection in its handshake holds besides ngtcp2's counted allocations: its
 * struct and its GnuTLS session, which cannot be counted (an estimate: the session
 * alone is some 9 KiB once the handshake is done, more during it). */
#define HS_FIXED_BYTES (sizeof(struct fpy3_qconn) + 12 * 1024)

/* The versions we speak, preferred first: what Version Negotiation lists, and what
 * compatible version negotiation (RFC 9368) picks from the client's offer. */
static const uint32_t versions[] = {NGTCP2_PROTO_VER_V2, NGTCP2_PROTO_VER_V1};

/* --- state ------------------------------------------------------------------------- */

struct fpy3_qconn {
    fpy3_qconn_base b; /* first: engine, app state, handle, dirty list */
    ngtcp2_conn *conn;
    gnutls_session_t tls;
    ngtcp2_crypto_conn_ref ref;
    fpy3_timer timer; /* ngtcp2's expiry; the closing or draining period's end */
    int state;
    ngtcp2_cid odcid; /* the client's first DCID: a map key until close */
    ngtcp2_ccerr ccerr;
    int err_set;
    /* CONNECTION_CLOSE kept for the closing period; owned here, freed in conn_delete. */
    uint8_t *closebuf;
    size_t closelen;
    uint32_t close_rx;
    FILE *qlog;
    uint64_t lost_packets; /* packets with stream data declared lost (metrics) */
    ng_cred *cred;         /* one reference, dropped in conn_delete */
    int tls_known;         /* the fields below are filled (after the handshake) */
    uint16_t cipher_suite; /* IANA number, kept once the TLS session is gone */
    uint8_t *peer_certs;   /* the client's chain for fpy3_tls_info; owned, freed in conn_delete */
    size_t peer_certs_len;
    char *peer_name;       /* owned, freed in conn_delete */
    ngtcp2_mem mem;     /* ngtcp2's allocator for this connection: counts mem_bytes */
    uint64_t mem_bytes; /* what ngtcp2 holds for it */
    int in_hs;          /* counted in the engine's handshakes (nhandshake, hs_mem) */
    int hs_done;        /* the handshake completed: the TLS session can go */
};

struct fpy3_engine {
    fpy3_engine_base b; /* first: ops, app callbacks, connection table, dirty list */
    fpy3_engine_config cfg;
    char *qlog_dir; /* owned copy; NULL = off */
    char *client_ca; /* owned copy, read again on a reload; NULL = no client certificates */
    uint8_t alpn[256];
    size_t alpnlen;
    ng_cred *cred; /* the current credentials (one reference) */
    gnutls_priority_t prio;
    gnutls_datum_t ticket_key; /* points into cfg.ticket_key */
    gnutls_anti_replay_t anti_replay;
    replay_slot *replay; /* REPLAY_SLOTS of them when 0-RTT is on; owned, freed in ng_free */
    uint32_t replay_next;
    int accepting;
    ngtcp2_tstamp now;
    fpy3_udp udp;
    fpy3_cid_map map;
    fpy3_timer_heap timers;
    size_t nconns;  /* all, closing and draining ones included */
    size_t nactive; /* those that can still carry data */
    size_t nhandshake; /* connections in their handshake */
    uint64_t hs_mem;   /* what they hold */
    uint64_t ng_mem;   /* what ngtcp2 holds for all connections */
    uint64_t retries, refused;
    uint32_t sr_tokens;
    ngtcp2_tstamp sr_refill;
};

static void conn_delete(fpy3_qconn *qc);
static void ng_extend(fpy3_qconn *qc, int64_t sid, uint64_t n);
static void ng_free(fpy3_engine *e);

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

/* Nonce-grade randomness is enough for connection ids and padding; secrets use
 * the static secret. */
static void rand_bytes(void *p, size_t n) { gnutls_rnd(GNUTLS_RND_NONCE, p, n); }

static fpy3_qconn *timer_conn(fpy3_timer *t)
{
    return (fpy3_qconn *)((char *)t - offsetof(fpy3_qconn, timer));
}

static void update_timer(fpy3_qconn *qc)
{
    if (qc->state == QC_ACTIVE)
        fpy3_timer_set(&qc->b.e->timers, &qc->timer, ngtcp2_conn_get_expiry(qc->conn));
}

static void cred_unref(ng_cred *cr)
{
    if (cr && --cr->refs == 0) {
        gnutls_certificate_free_credentials(cr->c);
        free(cr);
    }
}

/* Client certificates, checked during the handshake: none is fine unless required
 * (GnuTLS refuses that case itself); one that does not chain to the CAs fails it. */
static int verify_client(gnutls_session_t s)
{
    ngtcp2_crypto_conn_ref *ref = gnutls_session_get_ptr(s);
    fpy3_qconn *qc = ref->user_data;
    unsigned n = 0, status = 0;
    if (!gnutls_certificate_get_peers(s, &n) || n == 0)
        return qc->b.e->cfg.client_auth == FPY3_CLIENT_AUTH_REQUIRED ? -1 : 0;
    if (gnutls_certificate_verify_peers2(s, &status) < 0 || status != 0)
        return -1;
    return 0;
}

/* New credentials from PEM files (one reference, the caller's), or NULL with err. */
static ng_cred *cred_load(const char *cert, const char *key, const char *password,
                          const char *client_ca, char *err, size_t errlen)
{
    ng_cred *cr = calloc(1, sizeof(*cr)); /* the caller's reference */
    if (!cr) {
        fpy3_seterr(err, errlen, "out of memory");
        return NULL;
    }
    cr->refs = 1;
    int rv = gnutls_certificate_allocate_credentials(&cr->c);
    if (rv < 0) {
        free(cr);
        fpy3_seterr(err, errlen, "gnutls credentials: %s", gnutls_strerror(rv));
        return NULL;
    }
    rv = gnutls_certificate_set_x509_key_file2(cr->c, cert, key, GNUTLS_X509_FMT_PEM,
                                               password && password[0] ? password : NULL, 0);
    if (rv < 0) {
        fpy3_seterr(err, errlen, "loading %s / %s: %s", cert ? cert : "(null)",
                    key ? key : "(null)", gnutls_strerror(rv));
        cred_unref(cr);
        return NULL;
    }
    if (client_ca && client_ca[0]) {
        rv = gnutls_certificate_set_x509_trust_file(cr->c, client_ca, GNUTLS_X509_FMT_PEM);
        if (rv <= 0) {
            fpy3_seterr(err, errlen, "loading the client CAs %s: %s", client_ca,
                        rv < 0 ? gnutls_strerror(rv) : "no certificate in it");
            cred_unref(cr);
            return NULL;
        }
        gnutls_certificate_set_verify_function(cr->c, verify_client);
    }
    return cr;
}

/* GnuTLS anti-replay database: GNUTLS_E_DB_ENTRY_EXISTS refuses the early data. */
static int replay_add(void *ptr, time_t exp, const gnutls_datum_t *key, const gnutls_datum_t *data)
{
    fpy3_engine *e = ptr;
    (void)data;
    time_t now = time(NULL);
    size_t len = key->size < REPLAY_KEY_MAX ? key->size : REPLAY_KEY_MAX;
    for (uint32_t i = 0; i < REPLAY_SLOTS; i++) {
        replay_slot *r = &e->replay[i];
        if (r->expires >= now && r->len == len && memcmp(r->key, key->data, len) == 0)
            return GNUTLS_E_DB_ENTRY_EXISTS;
    }
    replay_slot *r = &e->replay[e->replay_next];
    if (r->expires >= now)
        return GNUTLS_E_DB_ENTRY_EXISTS; /* all remembered: refuse rather than forget */
    r->expires = exp;
    r->len = (uint8_t)len;
    memcpy(r->key, key->data, len);
    e->replay_next = (e->replay_next + 1) % REPLAY_SLOTS;
    return 0;
}

/* Queues a packet built at the reserved place of the send batch. */
static void tx_commit(fpy3_engine *e, size_t len, size_t seg, const ngtcp2_path *path,
                      uint32_t ecn)
{
    fpy3_udp_commit(&e->udp, len, seg, path->remote.addr, path->remote.addrlen,
                    path->local.addr, ecn);
}

/* A packet not tied to a connection (version negotiation, Retry, reset, close). */
static uint8_t *oneoff_buf(fpy3_engine *e) { return fpy3_udp_reserve(&e->udp, ONEOFF_MAX); }

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

/* --- memory per connection -------------------------------------------------------- */

static void mem_count(fpy3_qconn *qc, int64_t delta)
{
    qc->mem_bytes += (uint64_t)delta;
    qc->b.e->ng_mem += (uint64_t)delta;
    if (qc->in_hs)
        qc->b.e->hs_mem += (uint64_t)delta;
}

static void *mem_malloc(size_t size, void *ud)
{
    void *p = malloc(size); /* ngtcp2's, until mem_free */
    if (p)
        mem_count(ud, (int64_t)malloc_usable_size(p));
    return p;
}

static void mem_free(void *p, void *ud)
{
    if (!p)
        return;
    mem_count(ud, -(int64_t)malloc_usable_size(p));
    free(p);
}

static void *mem_calloc(size_t nmemb, size_t size, void *ud)
{
    void *p = calloc(nmemb, size); /* ngtcp2's, until mem_free */
    if (p)
        mem_count(ud, (int64_t)malloc_usable_size(p));
    return p;
}

static void *mem_realloc(void *p, size_t size, void *ud)
{
    size_t old = p ? malloc_usable_size(p) : 0;
    void *np = realloc(p, size); /* ngtcp2's, until mem_free */
    if (np)
        mem_count(ud, (int64_t)malloc_usable_size(np) - (int64_t)old);
    else if (size == 0)
        mem_count(ud, -(int64_t)old);
    return np;
}

/* The connection's handshake is over (done, or the connection is going): it no longer
 * counts toward the handshake pressure. */
static void hs_leave(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->b.e;
    if (!qc->in_hs)
        return;
    qc->in_hs = 0;
    e->nhandshake--;
    e->hs_mem -= qc->mem_bytes + HS_FIXED_BYTES;
}

/* New clients must prove their address first (Retry): too many handshakes, or too
 * much memory in them. */
static int hs_pressure(const fpy3_engine *e)
{
    return (e->cfg.max_handshakes && e->nhandshake >= e->cfg.max_handshakes) ||
           (e->cfg.handshake_memory && e->hs_mem >= e->cfg.handshake_memory);
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
    fpy3_engine *e = qc->b.e;
    (void)conn;
    (void)cidlen; /* always SCID_LEN: it is what the connection was created with */
    do
        make_cid(e, cid);
    while (fpy3_cid_find(&e->map, cid->data, cid->datalen));
    if (ngtcp2_crypto_generate_stateless_reset_token(token, e->cfg.static_secret,
                                                     sizeof(e->cfg.static_secret), cid) != 0)
        return NGTCP2_ERR_CALLBACK_FAILURE;
    if (fpy3_cid_put(&e->map, cid, qc) < 0)
        return NGTCP2_ERR_CALLBACK_FAILURE;
    return 0;
}

static int cb_remove_cid(ngtcp2_conn *conn, const ngtcp2_cid *cid, void *ud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    fpy3_cid_del(&qc->b.e->map, cid, qc);
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
    if (level != NGTCP2_ENCRYPTION_LEVEL_1RTT || qc->b.ac)
        return 0;
    fpy3_engine *e = qc->b.e;
    qc->b.ac = e->b.cb.conn_open(e->b.app, qc);
    return qc->b.ac ? 0 : app_fail(qc);
}

static uint16_t iana_suite(gnutls_cipher_algorithm_t c);
static void peer_certs_read(fpy3_qconn *qc);

static int cb_handshake_completed(ngtcp2_conn *conn, void *ud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    hs_leave(qc);
    /* Tickets go out once the handshake is complete (GNUTLS_NO_AUTO_SEND_TICKET);
     * without one (no memory) the client just does a full handshake next time. */
    if (qc->b.e->cfg.session_tickets)
        (void)gnutls_session_ticket_send(qc->tls, 1, 0);
    /* What the scope's TLS extension needs, read now: the session goes after this
     * packet (tls_release). */
    qc->cipher_suite = iana_suite(gnutls_cipher_get(qc->tls));
    if (!qc->tls_known)
        peer_certs_read(qc);
    qc->hs_done = 1;
    return 0;
}

/* The handshake is over: its TLS session (some 20 KiB) is not needed any more, as QUIC
 * has no TLS messages after it that a server must read (RFC 9001 6: no KeyUpdate; the
 * tickets went out and the client's certificates were read as it completed) and key
 * updates use ngtcp2's own crypto context. Freed after the packet that completed it was processed, never
 * from inside a TLS callback. */
static void tls_release(fpy3_qconn *qc)
{
    if (!qc->tls || !qc->hs_done)
        return;
    ngtcp2_conn_set_tls_native_handle(qc->conn, NULL);
    gnutls_deinit(qc->tls);
    qc->tls = NULL;
}

static int cb_recv_crypto_data(ngtcp2_conn *conn, ngtcp2_encryption_level level, uint64_t offset,
                               const uint8_t *data, size_t datalen, void *ud)
{
    fpy3_qconn *qc = ud;
    if (!qc->tls)
        return 0; /* after the handshake: a post-handshake message, not read (see above) */
    return ngtcp2_crypto_recv_crypto_data_cb(conn, level, offset, data, datalen, ud);
}

static int cb_recv_stream_data(ngtcp2_conn *conn, uint32_t flags, int64_t sid, uint64_t offset,
                               const uint8_t *data, size_t len, void *ud, void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)offset;
    (void)sud;
    if (!qc->b.ac) {
        ng_extend(qc, sid, len);
        return 0;
    }
    if (qc->b.e->b.cb.recv(qc->b.ac, sid, data, len, !!(flags & NGTCP2_STREAM_DATA_FLAG_FIN)) < 0)
        return app_fail(qc);
    return 0;
}

static int cb_acked(ngtcp2_conn *conn, int64_t sid, uint64_t offset, uint64_t len, void *ud,
                    void *sud)
{
    fpy3_qconn *qc = ud;
    (void)offset;
    /* Lost packets (metrics): the stream's count, which ngtcp2 forgets with the stream,
     * taken as data gets acked; the stream's user data is the part counted already. */
    size_t lost = ngtcp2_conn_get_stream_loss_count(conn, sid), seen = (size_t)(uintptr_t)sud;
    if (lost > seen) {
        qc->lost_packets += lost - seen;
        ngtcp2_conn_set_stream_user_data(conn, sid, (void *)(uintptr_t)lost);
    }
    if (qc->b.ac && qc->b.e->b.cb.acked(qc->b.ac, sid, len) < 0)
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

    if (qc->b.ac && qc->b.e->b.cb.stream_close(qc->b.ac, sid, app_error) < 0)
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
    if (qc->b.ac && qc->b.e->b.cb.peer_reset(qc->b.ac, sid, app_error) < 0)
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
    if (qc->b.ac && qc->b.e->b.cb.stop_reading(qc->b.ac, sid) < 0)
        return app_fail(qc);
    return 0;
}

static int cb_extend_max_remote_bidi(ngtcp2_conn *conn, uint64_t max_streams, void *ud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    if (qc->b.ac)
        qc->b.e->b.cb.max_streams(qc->b.ac, max_streams);
    return 0;
}

static int cb_extend_max_stream_data(ngtcp2_conn *conn, int64_t sid, uint64_t max_data,
                                     void *ud, void *sud)
{
    fpy3_qconn *qc = ud;
    (void)conn;
    (void)max_data;
    (void)sud;
    if (qc->b.ac && qc->b.e->b.cb.unblocked(qc->b.ac, sid) < 0)
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
    if (sel.size != qc->b.e->alpnlen || memcmp(sel.data, qc->b.e->alpn, sel.size) != 0)
        return GNUTLS_E_NO_APPLICATION_PROTOCOL;
    return 0;
}

static const ngtcp2_callbacks callbacks = {
    .recv_client_initial = ngtcp2_crypto_recv_client_initial_cb,
    .recv_crypto_data = cb_recv_crypto_data,
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
    .handshake_completed = cb_handshake_completed,
};

/* --- connection lifecycle ---------------------------------------------------------- */

static void app_detach(fpy3_qconn *qc)
{
    void *ac = qc->b.ac;
    if (!ac)
        return;
    qc->b.ac = NULL; /* engine calls made from conn_close see no app and do nothing */
    qc->b.e->b.cb.conn_close(ac);
}

static void conn_delete(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->b.e;
    app_detach(qc);
    fpy3_timer_remove(&e->timers, &qc->timer);
    fpy3_dirty_del(qc);
    if (qc->odcid.datalen)
        fpy3_cid_del(&e->map, &qc->odcid, qc);
    hs_leave(qc);
    if (qc->conn) {
        size_t n = ngtcp2_conn_get_scid(qc->conn, NULL);
        ngtcp2_cid ids[16], *p = n <= 16 ? ids : malloc(n * sizeof(*p)); /* freed here */
        if (p) {
            ngtcp2_conn_get_scid(qc->conn, p);
            for (size_t i = 0; i < n; i++)
                fpy3_cid_del(&e->map, &p[i], qc);
            if (p != ids)
                free(p);
        } else {
            fpy3_cid_del_all(&e->map, qc); /* no id may outlive qc in the map */
        }
        ngtcp2_conn_del(qc->conn);
    }
    if (qc->tls)
        gnutls_deinit(qc->tls);
    cred_unref(qc->cred);
    free(qc->peer_certs);
    free(qc->peer_name);
    if (qc->qlog)
        fclose(qc->qlog);
    free(qc->closebuf);
    fpy3_conn_table_remove(&e->b, qc);
    e->nconns--;
    if (qc->state == QC_ACTIVE)
        e->nactive--;
    free(qc);
}

static ngtcp2_duration close_wait(fpy3_qconn *qc) { return 3 * ngtcp2_conn_get_pto(qc->conn); }

static void start_draining(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->b.e;
    if (qc->state == QC_ACTIVE)
        e->nactive--;
    qc->state = QC_DRAINING;
    fpy3_dirty_del(qc);
    app_detach(qc);
    fpy3_timer_set(&e->timers, &qc->timer, e->now + close_wait(qc));
}

/* Sends CONNECTION_CLOSE with qc->ccerr and enters the closing period. */
static void start_closing(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->b.e;
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
    qc->closebuf = malloc(NGTCP2_MAX_UDP_PAYLOAD_SIZE); /* qc's, freed in conn_delete */
    if (!qc->closebuf) {
        /* No memory to keep it for the closing period: send the close once, go. */
        uint8_t *buf = fpy3_udp_reserve(&e->udp, NGTCP2_MAX_UDP_PAYLOAD_SIZE);
        ngtcp2_ssize n = buf ? ngtcp2_conn_write_connection_close(
                                   qc->conn, &ps.path, &pi, buf, NGTCP2_MAX_UDP_PAYLOAD_SIZE,
                                   &qc->ccerr, e->now)
                             : -1;
        if (n > 0)
            tx_commit(e, (size_t)n, (size_t)n, &ps.path, 0);
        conn_delete(qc);
        return;
    }
    ngtcp2_ssize n = ngtcp2_conn_write_connection_close(
        qc->conn, &ps.path, &pi, qc->closebuf, NGTCP2_MAX_UDP_PAYLOAD_SIZE, &qc->ccerr, e->now);
    if (n <= 0) {
        conn_delete(qc);
        return;
    }
    qc->closelen = (size_t)n;
    qc->state = QC_CLOSING;
    e->nactive--;
    fpy3_dirty_del(qc);
    app_detach(qc);
    fpy3_timer_set(&e->timers, &qc->timer, e->now + close_wait(qc));
    uint8_t *buf = fpy3_udp_reserve(&e->udp, qc->closelen);
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
    fpy3_engine *e = qc->b.e;
    uint32_t k = ++qc->close_rx;
    if (k & (k - 1))
        return;
    uint8_t *buf = fpy3_udp_reserve(&e->udp, qc->closelen);
    if (!buf)
        return;
    memcpy(buf, qc->closebuf, qc->closelen);
    tx_commit(e, qc->closelen, qc->closelen, ngtcp2_conn_get_path(qc->conn), 0);
}

static fpy3_qconn *conn_new(fpy3_engine *e, const ngtcp2_pkt_hd *hd, const ngtcp2_cid *ocid,
                            ngtcp2_token_type token_type, const ngtcp2_path *path)
{
    /* A place in the timer heap for every connection, taken before there is one, so
     * setting a connection's timer never fails. */
    if (fpy3_timer_heap_reserve(&e->timers, (uint32_t)(e->nconns + 1)) < 0)
        return NULL;
    fpy3_qconn *qc = calloc(1, sizeof(*qc)); /* owned by the engine until conn_delete */
    if (!qc)
        return NULL;
    qc->b.e = e;
    fpy3_timer_init(&qc->timer);
    qc->ref.get_conn = get_conn;
    qc->ref.user_data = qc;
    qc->mem = (ngtcp2_mem){.user_data = qc,
                           .malloc = mem_malloc,
                           .free = mem_free,
                           .calloc = mem_calloc,
                           .realloc = mem_realloc};
    ngtcp2_ccerr_default(&qc->ccerr);
    if (fpy3_conn_table_add(&e->b, qc) < 0) {
        free(qc);
        return NULL;
    }
    e->nconns++;
    e->nactive++;
    qc->in_hs = 1;
    e->nhandshake++;
    e->hs_mem += HS_FIXED_BYTES;

    ngtcp2_cid scid;
    do
        make_cid(e, &scid);
    while (fpy3_cid_find(&e->map, scid.data, scid.datalen));

    ngtcp2_settings settings;
    ngtcp2_settings_default(&settings);
    settings.initial_ts = e->now;
    settings.max_tx_udp_payload_size = e->cfg.max_udp_payload;
    settings.token = hd->token;
    settings.tokenlen = hd->tokenlen;
    settings.token_type = token_type;
    settings.handshake_timeout = e->cfg.handshake_timeout_ms * NGTCP2_MILLISECONDS;
    /* Compatible version negotiation (RFC 9368): a v1 client offering v2 gets v2. */
    settings.preferred_versions = versions;
    settings.preferred_versionslen = sizeof(versions) / sizeof(versions[0]);
    settings.available_versions = versions;
    settings.available_versionslen = sizeof(versions) / sizeof(versions[0]);
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
    params.max_udp_payload_size = FPY3_UDP_RX_BUFSZ;
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
                               &settings, &params, &qc->mem, qc) != 0)
        goto fail;

    unsigned flags = GNUTLS_SERVER | GNUTLS_NO_END_OF_EARLY_DATA;
    if (e->cfg.session_tickets)
        flags |= GNUTLS_NO_AUTO_SEND_TICKET;
    if (e->anti_replay)
        flags |= GNUTLS_ENABLE_EARLY_DATA;
    if (gnutls_init(&qc->tls, flags) != 0) {
        qc->tls = NULL;
        goto fail;
    }
    qc->cred = e->cred;
    e->cred->refs++;
    gnutls_datum_t alpn = {.data = e->alpn, .size = (unsigned)e->alpnlen};
    if (e->cfg.session_tickets) {
        if (gnutls_session_ticket_enable_server(qc->tls, &e->ticket_key) != 0)
            goto fail;
        gnutls_db_set_cache_expiration(qc->tls, (int)e->cfg.ticket_lifetime);
    }
    if (e->anti_replay) {
        gnutls_anti_replay_enable(qc->tls, e->anti_replay);
        gnutls_record_set_max_early_data_size(qc->tls, 0xffffffffu);
    }
    if (e->cfg.client_auth != FPY3_CLIENT_AUTH_NONE) {
        gnutls_certificate_server_set_request(qc->tls, e->cfg.client_auth ==
                                                               FPY3_CLIENT_AUTH_REQUIRED
                                                           ? GNUTLS_CERT_REQUIRE
                                                           : GNUTLS_CERT_REQUEST);
    }
    if (gnutls_priority_set(qc->tls, e->prio) != 0 ||
        ngtcp2_crypto_gnutls_configure_server_session(qc->tls) != 0 ||
        gnutls_credentials_set(qc->tls, GNUTLS_CRD_CERTIFICATE, qc->cred->c) != 0 ||
        gnutls_alpn_set_protocols(qc->tls, &alpn, 1,
                                  GNUTLS_ALPN_MANDATORY | GNUTLS_ALPN_SERVER_PRECEDENCE) != 0)
        goto fail;
    gnutls_handshake_set_hook_function(qc->tls, GNUTLS_HANDSHAKE_CLIENT_HELLO, GNUTLS_HOOK_POST,
                                       alpn_hook);
    gnutls_session_set_ptr(qc->tls, &qc->ref);
    ngtcp2_conn_set_tls_native_handle(qc->conn, qc->tls);

    qc->odcid = hd->dcid;
    if (fpy3_cid_put(&e->map, &hd->dcid, qc) < 0 || fpy3_cid_put(&e->map, &scid, qc) < 0)
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
    /* A reserved version first (greasing), then the ones we speak. */
    uint32_t sv[3];
    rand_bytes(&sv[0], sizeof(sv[0]));
    sv[0] = (sv[0] & 0xf0f0f0f0u) | 0x0a0a0a0au;
    sv[1] = versions[0];
    sv[2] = versions[1];
    ngtcp2_ssize n = ngtcp2_pkt_write_version_negotiation(buf, ONEOFF_MAX, unused, vc->scid,
                                                          vc->scidlen, vc->dcid, vc->dcidlen,
                                                          sv, 3);
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
    if (n > 0) {
        oneoff_send(e, (size_t)n, path);
        e->retries++;
    }
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
    int rv = ngtcp2_conn_read_pkt(qc->conn, path, pi, pkt, len, qc->b.e->now);
    if (rv == 0) {
        tls_release(qc);
        fpy3_dirty_add(qc);
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
    if (e->cfg.max_connections && e->nactive >= e->cfg.max_connections) {
        e->refused++;
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
        if (e->cfg.retry || hs_pressure(e)) {
            send_retry(e, &hd, path, len);
            return;
        }
    }
    fpy3_qconn *qc = conn_new(e, &hd, pocid, ttype, path);
    if (!qc) {
        /* No memory for it: refuse at once rather than leave the client to time out. */
        send_stateless_close(e, &hd, path, NGTCP2_INTERNAL_ERROR);
        return;
    }
    int rv = ngtcp2_conn_read_pkt(qc->conn, path, pi, pkt, len, e->now);
    if (rv == 0) {
        fpy3_dirty_add(qc);
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
    fpy3_qconn *qc = fpy3_cid_find(&e->map, vc.dcid, vc.dcidlen);
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

/* --- write path -------------------------------------------------------------------- */

/* Writes one burst (at most the send quantum) of qc's packets into the send batch. */
static void conn_write(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->b.e;
    ngtcp2_conn *c = qc->conn;
    if (qc->state != QC_ACTIVE)
        return;
    size_t max_udp = ngtcp2_conn_get_max_tx_udp_payload_size(c);
    size_t path_max = ngtcp2_conn_get_path_max_tx_udp_payload_size(c);
    size_t quantum = ngtcp2_conn_get_send_quantum(c);
    if (quantum > FPY3_UDP_GSO_MAX_BYTES)
        quantum = FPY3_UDP_GSO_MAX_BYTES;
    if (quantum < path_max)
        quantum = path_max;
    uint8_t *buf = fpy3_udp_reserve(&e->udp, quantum);
    if (!buf) {
        fpy3_dirty_add(qc); /* blocked: try again on the next flush */
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
        if (qc->b.ac && ngtcp2_conn_get_max_data_left(c)) {
            nvec = e->b.cb.pull(qc->b.ac, &sid, &fin, vec, 16);
            if (nvec < 0)
                goto app_error;
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
                if (qc->b.ac)
                    e->b.cb.blocked(qc->b.ac, sid);
                continue;
            case NGTCP2_ERR_STREAM_SHUT_WR:
                if (qc->b.ac)
                    e->b.cb.shut_wr(qc->b.ac, sid);
                continue;
            case NGTCP2_ERR_WRITE_MORE:
                if (qc->b.ac && e->b.cb.written(qc->b.ac, sid, (size_t)ndatalen) < 0)
                    goto app_error;
                continue;
            default:
                if (off)
                    tx_commit(e, off, seg, &prev.path, prev_ecn);
                fail_liberr(qc, (int)n);
                return;
            }
        }
        if (ndatalen >= 0 && qc->b.ac && e->b.cb.written(qc->b.ac, sid, (size_t)ndatalen) < 0)
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
        if (quantum - off < path_max || (size_t)n < seg || nseg >= FPY3_UDP_GSO_MAX_SEGS)
            break;
    }
    if (off)
        tx_commit(e, off, seg, &prev.path, prev_ecn);
    ngtcp2_conn_update_pkt_tx_time(c, ts);
    update_timer(qc);
    return;
app_error:
    /* Packets already built go out first: the close must come after them. */
    if (off)
        tx_commit(e, off, seg, &prev.path, prev_ecn);
    if (!qc->err_set)
        ngtcp2_ccerr_set_liberr(&qc->ccerr, NGTCP2_ERR_CALLBACK_FAILURE, NULL, 0);
    start_closing(qc);
}

static int write_one(fpy3_qconn *qc)
{
    fpy3_engine *e = qc->b.e; /* conn_write may delete qc */
    conn_write(qc);
    return e->udp.blocked ? -1 : 0; /* a full socket ends the pass */
}

static void write_dirty(fpy3_engine *e, int honor_defer)
{
    fpy3_dirty_run(&e->b, honor_defer, write_one);
    if (fpy3_udp_pending(&e->udp))
        fpy3_udp_send(&e->udp);
}

/* --- public API -------------------------------------------------------------------- */

static fpy3_engine *ng_new(int fd, const fpy3_engine_config *cfg, const fpy3_engine_app *cb,
                           void *app, char *err, size_t errlen)
{
    fpy3_engine *e = calloc(1, sizeof(*e)); /* freed by ng_free */
    if (!e) {
        fpy3_seterr(err, errlen, "out of memory");
        return NULL;
    }
    fpy3_engine_base_init(&e->b, &fpy3_engine_ngtcp2, cb, app);
    e->udp.fd = -1;
    e->cfg = *cfg;
    e->accepting = 1;
    e->sr_tokens = SR_PER_SEC;
    e->cfg.cert_file = e->cfg.key_file = e->cfg.qlog_dir = e->cfg.alpn = NULL; /* not kept */
    e->cfg.key_password = e->cfg.client_ca = NULL;
    e->ticket_key.data = e->cfg.ticket_key;
    e->ticket_key.size = sizeof(e->cfg.ticket_key);
    if (!e->cfg.ticket_lifetime)
        e->cfg.ticket_lifetime = 21600;
    if (!e->cfg.max_udp_payload)
        e->cfg.max_udp_payload = 1452;
    if (e->cfg.max_udp_payload < 1200)
        e->cfg.max_udp_payload = 1200;
    if (e->cfg.max_udp_payload > FPY3_UDP_RX_BUFSZ)
        e->cfg.max_udp_payload = FPY3_UDP_RX_BUFSZ;
    if (!e->cfg.max_streams_uni)
        e->cfg.max_streams_uni = 3;
    if (!e->cfg.handshake_timeout_ms)
        e->cfg.handshake_timeout_ms = 10000;
    const char *alpn = cfg->alpn ? cfg->alpn : "h3";
    e->alpnlen = strlen(alpn);
    if (e->alpnlen == 0 || e->alpnlen > 255) {
        fpy3_seterr(err, errlen, "bad ALPN");
        goto fail;
    }
    memcpy(e->alpn, alpn, e->alpnlen);
    if (cfg->qlog_dir && cfg->qlog_dir[0] && !(e->qlog_dir = strdup(cfg->qlog_dir))) {
        fpy3_seterr(err, errlen, "out of memory");
        goto fail;
    }
    if (fpy3_udp_init(&e->udp, fd, err, errlen) < 0)
        goto fail;
    uint64_t seed;
    rand_bytes(&seed, sizeof(seed));
    if (fpy3_cid_map_init(&e->map, 1024, seed) < 0) {
        fpy3_seterr(err, errlen, "out of memory");
        goto fail;
    }

    if (cfg->client_auth && cfg->client_ca && !(e->client_ca = strdup(cfg->client_ca))) {
        fpy3_seterr(err, errlen, "out of memory");
        goto fail;
    }
    e->cred = cred_load(cfg->cert_file, cfg->key_file, cfg->key_password, e->client_ca, err,
                        errlen);
    if (!e->cred)
        goto fail;
    if (cfg->early_data && cfg->session_tickets) {
        /* 0-RTT comes only with resumption; GnuTLS checks the ticket age against a
         * window and asks replay_add whether it saw this ClientHello already. */
        e->replay = calloc(REPLAY_SLOTS, sizeof(*e->replay)); /* freed in ng_free */
        if (!e->replay || gnutls_anti_replay_init(&e->anti_replay) != 0) {
            e->anti_replay = NULL;
            fpy3_seterr(err, errlen, "out of memory");
            goto fail;
        }
        gnutls_anti_replay_set_add_function(e->anti_replay, replay_add);
        gnutls_anti_replay_set_ptr(e->anti_replay, e);
    }
    int rv;
    /* TLS 1.3 only, the AEADs QUIC defines, no middlebox compatibility mode. */
    rv = gnutls_priority_init(&e->prio,
                              "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:"
                              "+AES-256-GCM:+CHACHA20-POLY1305:+AES-128-CCM:-GROUP-ALL:"
                              "+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1:"
                              "+GROUP-SECP521R1:%DISABLE_TLS13_COMPAT_MODE",
                              NULL);
    if (rv < 0) {
        e->prio = NULL;
        fpy3_seterr(err, errlen, "gnutls priority: %s", gnutls_strerror(rv));
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
    for (uint32_t i = 0; i < e->b.nslots; i++)
        if (e->b.slots[i])
            conn_delete(e->b.slots[i]);
    cred_unref(e->cred);
    if (e->anti_replay)
        gnutls_anti_replay_deinit(e->anti_replay);
    free(e->replay);
    if (e->prio)
        gnutls_priority_deinit(e->prio);
    fpy3_cid_map_free(&e->map);
    fpy3_timer_heap_free(&e->timers);
    fpy3_udp_free(&e->udp);
    fpy3_engine_base_free(&e->b);
    free(e->qlog_dir);
    free(e->client_ca);
    free(e);
}

static int ng_read(fpy3_engine *e)
{
    int total = 0;
    if (e->udp.blocked)
        fpy3_udp_send(&e->udp);
    for (int round = 0; round < RX_ROUNDS; round++) {
        int n = fpy3_udp_recv(&e->udp);
        e->now = mono_ns();
        for (int i = 0; i < n; i++) {
            fpy3_datagram d;
            if (fpy3_udp_datagram(&e->udp, i, &d) < 0 || d.len < 21) /* shorter is never QUIC */
                continue;
            ngtcp2_pkt_info pi = {.ecn = (uint8_t)d.ecn};
            ngtcp2_path path = {
                .local = {.addr = (struct sockaddr *)&d.local, .addrlen = d.locallen},
                .remote = {.addr = d.remote, .addrlen = d.remotelen},
            };
            handle_datagram(e, d.data, d.len, &path, &pi);
            total++;
        }
        if (n < FPY3_UDP_RX_BATCH)
            break;
    }
    e->now = mono_ns();
    write_dirty(e, 1);
    return total;
}

static int ng_expire(fpy3_engine *e)
{
    e->now = mono_ns();
    if (e->udp.blocked)
        fpy3_udp_send(&e->udp);
    uint32_t n;
    fpy3_timer **due = fpy3_timer_heap_take_due(&e->timers, e->now, &n);
    for (uint32_t i = 0; i < n; i++) {
        fpy3_qconn *qc = timer_conn(due[i]);
        if (qc->state != QC_ACTIVE) {
            conn_delete(qc); /* closing or draining period over */
            continue;
        }
        int rv = ngtcp2_conn_handle_expiry(qc->conn, e->now);
        if (rv == NGTCP2_ERR_IDLE_CLOSE || rv == NGTCP2_ERR_HANDSHAKE_TIMEOUT) {
            /* Silent, as for an idle timeout: a flood's spoofed sources get nothing. */
            conn_delete(qc);
            continue;
        }
        if (rv != 0) {
            fail_liberr(qc, rv);
            continue;
        }
        fpy3_dirty_add(qc);
        update_timer(qc);
    }
    write_dirty(e, 0);
    return (int)n;
}

static int ng_flush(fpy3_engine *e)
{
    e->now = mono_ns();
    if (e->udp.blocked && fpy3_udp_send(&e->udp) < 0)
        return -1;
    write_dirty(e, 0);
    return e->udp.blocked ? -1 : 0;
}

static int64_t ng_next_timeout_ms(fpy3_engine *e)
{
    if (e->b.dirty && !e->udp.blocked)
        return 0;
    ngtcp2_tstamp t = fpy3_timer_heap_next(&e->timers);
    if (t == FPY3_TIMER_NEVER)
        return -1;
    ngtcp2_tstamp now = mono_ns();
    if (t <= now)
        return 0;
    return (int64_t)((t - now + NGTCP2_MILLISECONDS - 1) / NGTCP2_MILLISECONDS);
}

static int ng_want_write(fpy3_engine *e) { return e->udp.blocked; }

static void ng_stop_accepting(fpy3_engine *e) { e->accepting = 0; }

static size_t ng_conn_count(fpy3_engine *e) { return e->nactive; }

static int wait_left_ms(ngtcp2_tstamp deadline)
{
    ngtcp2_tstamp now = mono_ns();
    return now >= deadline ? 0 : (int)((deadline - now) / NGTCP2_MILLISECONDS);
}

/* Every active connection sends CONNECTION_CLOSE with app_error now and enters its
 * closing period; the packets go to the socket before this returns (a full socket
 * is waited for, briefly). New connections are refused from now on. */
static void ng_close_all(fpy3_engine *e, uint64_t app_error)
{
    e->accepting = 0;
    e->now = mono_ns();
    ngtcp2_tstamp deadline = e->now + CLOSE_ALL_WAIT_MS * NGTCP2_MILLISECONDS;
    for (uint32_t i = 0; i < e->b.nslots; i++) {
        fpy3_qconn *qc = e->b.slots[i];
        if (!qc || qc->state != QC_ACTIVE)
            continue;
        ngtcp2_ccerr_set_application_error(&qc->ccerr, app_error, NULL, 0);
        qc->err_set = 1;
        /* Room for the close in the send batch, or it would wait for the peer's
         * next packet. */
        if (!fpy3_udp_reserve(&e->udp, NGTCP2_MAX_UDP_PAYLOAD_SIZE))
            fpy3_udp_send_wait(&e->udp, wait_left_ms(deadline));
        start_closing(qc); /* may delete qc: its slot empties */
    }
    fpy3_udp_send_wait(&e->udp, wait_left_ms(deadline));
}

static const struct sockaddr *ng_conn_peer(fpy3_qconn *qc, uint32_t *len)
{
    const ngtcp2_path *p = ngtcp2_conn_get_path(qc->conn);
    *len = (uint32_t)p->remote.addrlen;
    return p->remote.addr;
}

static const struct sockaddr *ng_conn_local(fpy3_qconn *qc, uint32_t *len)
{
    const ngtcp2_path *p = ngtcp2_conn_get_path(qc->conn);
    *len = (uint32_t)p->local.addrlen;
    return p->local.addr;
}

static void ng_mark(fpy3_qconn *qc)
{
    if (qc->state == QC_ACTIVE)
        fpy3_dirty_add(qc);
}

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

static void ng_grow(fpy3_qconn *qc, int64_t sid, uint64_t n)
{
    if (qc->state != QC_ACTIVE || n == 0)
        return;
    if (sid >= 0)
        ngtcp2_conn_extend_max_stream_offset(qc->conn, sid, n);
    else
        ngtcp2_conn_extend_max_offset(qc->conn, n);
}

static uint64_t ng_rtt_ns(fpy3_qconn *qc)
{
    if (qc->state != QC_ACTIVE)
        return 0;
    ngtcp2_conn_info ci;
    ngtcp2_conn_get_conn_info(qc->conn, &ci);
    return ci.smoothed_rtt;
}

static void ng_stats(fpy3_engine *e, fpy3_engine_stats *out)
{
    out->connections = e->nactive;
    out->handshakes = e->nhandshake;
    out->handshake_bytes = e->hs_mem;
    out->quic_bytes = e->ng_mem;
    out->retries = e->retries;
    out->refused = e->refused;
    out->pressure = !e->cfg.retry && hs_pressure(e);
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
    fpy3_dirty_add(qc);
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
    qc->b.e->now = mono_ns();
    start_closing(qc);
}

static int ng_fd(fpy3_engine *e) { return e->udp.fd; }

static void ng_conn_stats(fpy3_qconn *qc, fpy3_conn_stats *out)
{
    out->lost_packets = qc->lost_packets;
    if (!qc->conn)
        return;
    ngtcp2_conn_info info;
    ngtcp2_conn_get_conn_info(qc->conn, &info);
    out->smoothed_rtt_ns = info.smoothed_rtt;
}

static int ng_conn_early(fpy3_qconn *qc)
{
    return qc->state == QC_ACTIVE && !ngtcp2_conn_get_handshake_completed(qc->conn);
}

static uint16_t iana_suite(gnutls_cipher_algorithm_t c)
{
    switch (c) {
    case GNUTLS_CIPHER_AES_128_GCM:
        return 0x1301;
    case GNUTLS_CIPHER_AES_256_GCM:
        return 0x1302;
    case GNUTLS_CIPHER_CHACHA20_POLY1305:
        return 0x1303;
    case GNUTLS_CIPHER_AES_128_CCM:
        return 0x1304;
    default:
        return 0;
    }
}

/* The client's chain and subject, read once the handshake is complete. */
static void peer_certs_read(fpy3_qconn *qc)
{
    unsigned n = 0;
    const gnutls_datum_t *list = gnutls_certificate_get_peers(qc->tls, &n);
    qc->tls_known = 1;
    if (!list || !n)
        return;
    size_t total = 0;
    for (unsigned i = 0; i < n; i++)
        total += 4 + list[i].size;
    uint8_t *p = qc->peer_certs = malloc(total); /* qc's, freed in conn_delete */
    if (!p)
        return;
    for (unsigned i = 0; i < n; i++) {
        uint32_t len = htonl(list[i].size);
        memcpy(p, &len, 4);
        memcpy(p + 4, list[i].data, list[i].size);
        p += 4 + list[i].size;
    }
    qc->peer_certs_len = total;
    gnutls_x509_crt_t crt;
    gnutls_datum_t dn = {NULL, 0};
    if (gnutls_x509_crt_init(&crt) < 0)
        return;
    if (gnutls_x509_crt_import(crt, &list[0], GNUTLS_X509_FMT_DER) >= 0 &&
        gnutls_x509_crt_get_dn3(crt, &dn, 0) >= 0) {
        qc->peer_name = strndup((const char *)dn.data, dn.size); /* qc's, see above */
        gnutls_free(dn.data);
    }
    gnutls_x509_crt_deinit(crt);
}

static int ng_conn_tls(fpy3_qconn *qc, fpy3_tls_info *out)
{
    memset(out, 0, sizeof(*out));
    if (qc->tls) { /* early data, before the handshake completed */
        out->cipher_suite = iana_suite(gnutls_cipher_get(qc->tls));
        if (!qc->tls_known && qc->state == QC_ACTIVE &&
            ngtcp2_conn_get_handshake_completed(qc->conn))
            peer_certs_read(qc);
    } else if (qc->tls_known) {
        out->cipher_suite = qc->cipher_suite; /* read as it completed */
    } else {
        return -1;
    }
    out->tls_version = 0x0304; /* QUIC is TLS 1.3 only */
    out->certs = qc->peer_certs;
    out->certs_len = qc->peer_certs_len;
    out->cert_name = qc->peer_name;
    return 0;
}

static int ng_reload_credentials(fpy3_engine *e, const char *cert, const char *key,
                                 const char *password, char *err, size_t errlen)
{
    ng_cred *cr = cred_load(cert, key, password, e->client_ca, err, errlen);
    if (!cr)
        return -1;
    cred_unref(e->cred); /* connections using it keep their references */
    e->cred = cr;
    return 0;
}

const fpy3_engine_ops fpy3_engine_ngtcp2 = {
    .new = ng_new,
    .free = ng_free,
    .fd = ng_fd,
    .read = ng_read,
    .expire = ng_expire,
    .flush = ng_flush,
    .next_timeout_ms = ng_next_timeout_ms,
    .want_write = ng_want_write,
    .stop_accepting = ng_stop_accepting,
    .conn_count = ng_conn_count,
    .close_all = ng_close_all,
    .each = fpy3_common_each,
    .conn_handle = fpy3_common_conn_handle,
    .conn_find = fpy3_common_conn_find,
    .conn_peer = ng_conn_peer,
    .conn_local = ng_conn_local,
    .mark = ng_mark,
    .defer = fpy3_common_defer,
    .open_uni = ng_open_uni,
    .extend = ng_extend,
    .grow = ng_grow,
    .rtt_ns = ng_rtt_ns,
    .stats = ng_stats,
    .extend_streams_bidi = ng_extend_streams_bidi,
    .max_streams_bidi = ng_max_streams_bidi,
    .shutdown_stream = ng_shutdown_stream,
    .conn_error = ng_conn_error,
    .conn_close = ng_conn_close,
    .conn_stats = ng_conn_stats,
    .conn_early = ng_conn_early,
    .conn_tls = ng_conn_tls,
    .reload_credentials = ng_reload_credentials,
};
