/* engine: the QUIC engine interface that h3.c sits on.
 *
 * An engine owns QUIC connections on one UDP socket (MsQuic binds its own, and runs
 * on the loop thread through an epoll set it fills). It knows no
 * HTTP: per connection it hands stream bytes up and pulls stream bytes down
 * through the callbacks in fpy3_engine_app. Everything runs on the loop thread;
 * a callback never re-enters fpy3_engine_read/expire/flush.
 *
 * Stream data ownership: bytes given to the engine by `pull` stay owned by the
 * app and must stay valid until `acked` covers them, or the stream or the
 * connection closes (the engine keeps pointers, never copies).
 *
 * The write path is pulled (ngtcp2 builds packets on demand). An engine with a
 * push API (MsQuic) drains `pull` at flush time into StreamSend calls, reports
 * each as `written`, and maps SEND_COMPLETE to `acked`.
 *
 * Two engines implement it (engine_ngtcp2.c, engine_msquic.c); engine.c picks one
 * per fpy3_engine_new (cfg->engine) and dispatches through its ops table. What they
 * share is in engine_common.c (connection table and handles, dirty list); ngtcp2's
 * socket side is udp_batch.c, cid_map.c and timer_heap.c.
 */
#ifndef FPY3_ENGINE_H
#define FPY3_ENGINE_H

#include <stddef.h>
#include <stdint.h>

struct sockaddr;
typedef struct fpy3_engine fpy3_engine;
typedef struct fpy3_qconn fpy3_qconn; /* one QUIC connection inside an engine */

/* Same layout as ngtcp2_vec and nghttp3_vec, so both cast to it. */
typedef struct {
    uint8_t *base;
    size_t len;
} fpy3_vec;

#define FPY3_SHUT_RD 1 /* STOP_SENDING */
#define FPY3_SHUT_WR 2 /* RESET_STREAM */

/* Strings are read during fpy3_engine_new only. */
#define FPY3_ENGINE_NGTCP2 0
#define FPY3_ENGINE_MSQUIC 1

typedef struct {
    int engine;            /* FPY3_ENGINE_* */
    /* MsQuic binds its own socket (fd is -1): the address to listen on. */
    const char *listen_host; /* numeric IPv4/IPv6; "" = any */
    uint16_t listen_port;
    const char *cert_file; /* PEM chain */
    const char *key_file;  /* PEM key */
    const char *alpn;      /* the one protocol offered, e.g. "h3" */
    const char *qlog_dir;  /* NULL or "" = no qlog */
    uint32_t worker_id;    /* bytes 1-4 of every server connection id */
    uint8_t static_secret[32];
    int retry;             /* address validation with Retry before any state, always */
    /* Handshake pressure: while more connections than max_handshakes are in their
     * handshake, or they hold more than handshake_memory bytes, new clients must
     * validate their address with a Retry first (0 = no bound). */
    uint32_t max_handshakes;
    uint64_t handshake_memory;
    uint64_t handshake_timeout_ms; /* a handshake not done by then is dropped */
    uint64_t max_connections;      /* more are refused with CONNECTION_REFUSED (0 = no limit) */
    uint64_t idle_timeout_ms;
    uint64_t max_streams_bidi;
    uint64_t max_streams_uni;
    uint64_t initial_max_data;
    uint64_t initial_max_stream_data;
    /* The app grows the connection window up to this (fpy3_engine_grow); an engine that
     * cannot grow it (MsQuic) opens it this wide from the start. */
    uint64_t max_window;
    size_t max_udp_payload;
    /* TLS beyond the certificate (ngtcp2; MsQuic ignores them). */
    const char *key_password; /* passphrase of an encrypted key_file; NULL or "" = none */
    const char *client_ca;    /* PEM CAs client certificates must chain to; NULL = none */
    int client_auth;          /* FPY3_CLIENT_AUTH_* */
    int session_tickets;      /* issue and accept TLS 1.3 tickets (resumption) */
    uint8_t ticket_key[64];   /* their master key, shared by every worker */
    uint32_t ticket_lifetime; /* seconds; the derived ticket key rotates this often */
    int early_data;           /* accept 0-RTT from resumed clients */
    /* fpy3_engine_free: the longest wait for closes to complete (MsQuic: its objects'
     * shutdowns; past it, its state is left allocated rather than freed under it). */
    uint64_t close_wait_ms;
} fpy3_engine_config;

#define FPY3_CLIENT_AUTH_NONE 0
#define FPY3_CLIENT_AUTH_OPTIONAL 1 /* a certificate may be absent; a bad one fails */
#define FPY3_CLIENT_AUTH_REQUIRED 2

/* A connection's TLS parameters, for the ASGI TLS extension. The pointers stay valid
 * until the connection closes. */
typedef struct {
    uint16_t tls_version;  /* 0x0304 */
    uint16_t cipher_suite; /* IANA id, 0 = unknown */
    const uint8_t *certs;  /* the client's chain: DER certificates, each after a 4-byte
                            * big-endian length; NULL = none (or not known yet) */
    size_t certs_len;
    const char *cert_name; /* RFC 4514 subject of the client's certificate, or NULL */
} fpy3_tls_info;

/* Engine -> app. `ac` is what conn_open returned. A callback returning < 0
 * closes the connection; call fpy3_engine_conn_error first to choose the
 * application error code sent in CONNECTION_CLOSE. */
typedef struct {
    /* 1-RTT keys are in place: the app may open streams. NULL refuses (close). */
    void *(*conn_open)(void *app, fpy3_qconn *qc);
    /* The connection can do no more I/O (closed, idle, failed): drop app state.
     * qc stays valid only during the call. */
    void (*conn_close)(void *ac);
    int (*recv)(void *ac, int64_t sid, const uint8_t *data, size_t len, int fin);
    int (*acked)(void *ac, int64_t sid, uint64_t n);
    int (*stream_close)(void *ac, int64_t sid, uint64_t app_error); /* 0: closed cleanly */
    int (*peer_reset)(void *ac, int64_t sid, uint64_t app_error); /* peer's RESET_STREAM */
    /* We stop reading sid (STOP_SENDING goes out): drop what it still receives. A peer's
     * STOP_SENDING shows up as shut_wr (the engine resets the stream itself). */
    int (*stop_reading)(void *ac, int64_t sid);
    int (*unblocked)(void *ac, int64_t sid); /* the peer gave stream credit */
    void (*max_streams)(void *ac, uint64_t max_bidi); /* peer may now open this many in all */
    /* Write path, pulled while packets are built: the next stream data to send.
     * Returns the number of vecs filled (0 with *sid = -1 when idle) or < 0. */
    long (*pull)(void *ac, int64_t *sid, int *fin, fpy3_vec *vec, size_t veccnt);
    int (*written)(void *ac, int64_t sid, size_t n); /* n pulled bytes are in packets */
    void (*blocked)(void *ac, int64_t sid);          /* stream flow-control blocked */
    void (*shut_wr)(void *ac, int64_t sid);          /* stream cannot be written any more */
} fpy3_engine_app;

/* fd: a bound, non-blocking UDP socket; the engine never closes it (ngtcp2; -1 for MsQuic). */
fpy3_engine *fpy3_engine_new(int fd, const fpy3_engine_config *cfg, const fpy3_engine_app *cb,
                             void *app, char *err, size_t errlen);
void fpy3_engine_free(fpy3_engine *e); /* closes every connection (conn_close called) */
/* The fd the loop watches for reading: the UDP socket, or MsQuic's epoll set. */
int fpy3_engine_fd(fpy3_engine *e);
/* Loads libmsquic (FPY3_MSQUIC_LIB, then libmsquic.so.2) once per process: 0, or -1
 * with the reason in err. */
int fpy3_msquic_load(char *err, size_t errlen);
/* MsQuic engines whose free ran out of close_wait_ms in this process: left allocated,
 * since MsQuic's objects still refer to them. */
size_t fpy3_msquic_left_open(void);

int fpy3_engine_read(fpy3_engine *e);   /* socket readable: receive a bounded batch, process, send */
int fpy3_engine_expire(fpy3_engine *e); /* the timer fired */
int fpy3_engine_flush(fpy3_engine *e);  /* send what marked connections have */
int64_t fpy3_engine_next_timeout_ms(fpy3_engine *e); /* -1 none, 0 now */
int fpy3_engine_want_write(fpy3_engine *e); /* packets wait for the socket to be writable */
void fpy3_engine_stop_accepting(fpy3_engine *e);
size_t fpy3_engine_conn_count(fpy3_engine *e); /* not closing or draining */
/* Closes every connection now with an application error (conn_close is called for
 * each) and stops accepting. The CONNECTION_CLOSE frames are on their way before it
 * returns: ngtcp2 writes them to the socket (waiting briefly if it is full); MsQuic
 * runs until their shutdowns complete (bounded). */
void fpy3_engine_close_all(fpy3_engine *e, uint64_t app_error);
/* Visit every connection's app state (those past conn_open). */
void fpy3_engine_each(fpy3_engine *e, void (*fn)(void *ac, void *arg), void *arg);

/* What an engine reports on itself (fields an engine does not track stay 0). */
typedef struct {
    uint64_t connections;     /* active (not closing or draining) */
    uint64_t handshakes;      /* of those, still in their handshake */
    uint64_t handshake_bytes; /* what connections in their handshake hold */
    uint64_t quic_bytes;      /* what the QUIC library holds for all connections */
    uint64_t retries;         /* Retry packets sent, since the start */
    uint64_t refused;         /* new connections refused at max_connections, since the start */
    int pressure;             /* handshake pressure now: new clients get a Retry */
} fpy3_engine_stats;
void fpy3_engine_stats_get(fpy3_engine *e, fpy3_engine_stats *out);

/* Connections. A handle is a 64-bit counter value, unique for the engine's life. */
uint64_t fpy3_engine_conn_handle(fpy3_qconn *qc);
void *fpy3_engine_conn_find(fpy3_engine *e, uint64_t handle); /* app state or NULL */
/* Addresses as sockaddr (sockaddr_in or sockaddr_in6) with lengths. */
const struct sockaddr *fpy3_engine_conn_peer(fpy3_qconn *qc, uint32_t *len);
const struct sockaddr *fpy3_engine_conn_local(fpy3_qconn *qc, uint32_t *len);
void fpy3_engine_mark(fpy3_qconn *qc); /* has something to send: the next flush writes it */
/* The app will flush soon (it queued events for this connection): fpy3_engine_read
 * leaves the connection's packets to that flush, saving a send. */
void fpy3_engine_defer(fpy3_qconn *qc);
int fpy3_engine_open_uni(fpy3_qconn *qc, int64_t *sid);
/* Flow-control credit for n consumed bytes: the stream's (sid >= 0) and the connection's. */
void fpy3_engine_extend(fpy3_qconn *qc, int64_t sid, uint64_t n);
/* Window growth (auto-tuning) on top of consumed credit: n more bytes for the stream
 * alone (sid >= 0) or the connection alone (sid < 0). A no-op on an engine that tunes
 * its windows itself (MsQuic), which also reports no RTT. */
void fpy3_engine_grow(fpy3_qconn *qc, int64_t sid, uint64_t n);
uint64_t fpy3_engine_rtt_ns(fpy3_qconn *qc); /* smoothed RTT; 0 = unknown */
void fpy3_engine_extend_streams_bidi(fpy3_qconn *qc, uint64_t n);
uint64_t fpy3_engine_max_streams_bidi(fpy3_qconn *qc);
int fpy3_engine_shutdown_stream(fpy3_qconn *qc, int64_t sid, uint64_t app_error, int how);
/* Inside a callback: the application error to close with when the callback fails. */
void fpy3_engine_conn_error(fpy3_qconn *qc, uint64_t app_error);
/* Outside callbacks: close now with an application error (conn_close is called). */
void fpy3_engine_conn_close(fpy3_qconn *qc, uint64_t app_error);
/* 1 while the handshake is not complete: stream data seen so far came in 0-RTT. */
int fpy3_engine_conn_early(fpy3_qconn *qc);
/* 0, or -1 when the engine cannot tell. */
int fpy3_engine_conn_tls(fpy3_qconn *qc, fpy3_tls_info *out);
/* New handshakes use these files from now on; open connections keep theirs. 0, or -1
 * with the reason in err (the old certificate stays). */
int fpy3_engine_reload_credentials(fpy3_engine *e, const char *cert_file, const char *key_file,
                                   const char *key_password, char *err, size_t errlen);

/* What the metrics take from a connection; 0 where the engine does not know. */
typedef struct {
    uint64_t smoothed_rtt_ns;
    uint64_t lost_packets; /* packets carrying stream data declared lost (sent again) */
} fpy3_conn_stats;
void fpy3_engine_conn_stats(fpy3_qconn *qc, fpy3_conn_stats *out);


/* The engine behind the functions above. Each engine's struct fpy3_engine starts
 * with its ops pointer, and each struct fpy3_qconn with its fpy3_engine pointer
 * (engine_common.h: fpy3_engine_base and fpy3_qconn_base). */
typedef struct {
    fpy3_engine *(*new)(int fd, const fpy3_engine_config *cfg, const fpy3_engine_app *cb,
                        void *app, char *err, size_t errlen);
    void (*free)(fpy3_engine *e);
    int (*fd)(fpy3_engine *e);
    int (*read)(fpy3_engine *e);
    int (*expire)(fpy3_engine *e);
    int (*flush)(fpy3_engine *e);
    int64_t (*next_timeout_ms)(fpy3_engine *e);
    int (*want_write)(fpy3_engine *e);
    void (*stop_accepting)(fpy3_engine *e);
    size_t (*conn_count)(fpy3_engine *e);
    void (*close_all)(fpy3_engine *e, uint64_t app_error);
    void (*each)(fpy3_engine *e, void (*fn)(void *ac, void *arg), void *arg);
    uint64_t (*conn_handle)(fpy3_qconn *qc);
    void *(*conn_find)(fpy3_engine *e, uint64_t handle);
    const struct sockaddr *(*conn_peer)(fpy3_qconn *qc, uint32_t *len);
    const struct sockaddr *(*conn_local)(fpy3_qconn *qc, uint32_t *len);
    void (*mark)(fpy3_qconn *qc);
    void (*defer)(fpy3_qconn *qc);
    int (*open_uni)(fpy3_qconn *qc, int64_t *sid);
    void (*extend)(fpy3_qconn *qc, int64_t sid, uint64_t n);
    /* Optional (NULL: a no-op, zeros). */
    void (*grow)(fpy3_qconn *qc, int64_t sid, uint64_t n);
    uint64_t (*rtt_ns)(fpy3_qconn *qc);
    void (*stats)(fpy3_engine *e, fpy3_engine_stats *out);
    void (*extend_streams_bidi)(fpy3_qconn *qc, uint64_t n);
    uint64_t (*max_streams_bidi)(fpy3_qconn *qc);
    int (*shutdown_stream)(fpy3_qconn *qc, int64_t sid, uint64_t app_error, int how);
    void (*conn_error)(fpy3_qconn *qc, uint64_t app_error);
    void (*conn_close)(fpy3_qconn *qc, uint64_t app_error);
    void (*conn_stats)(fpy3_qconn *qc, fpy3_conn_stats *out); /* NULL: nothing known */
    /* Optional (NULL: not supported by the engine). */
    int (*conn_early)(fpy3_qconn *qc);
    int (*conn_tls)(fpy3_qconn *qc, fpy3_tls_info *out);
    int (*reload_credentials)(fpy3_engine *e, const char *cert_file, const char *key_file,
                              const char *key_password, char *err, size_t errlen);
} fpy3_engine_ops;

extern const fpy3_engine_ops fpy3_engine_ngtcp2;
extern const fpy3_engine_ops fpy3_engine_msquic;

#endif
