/* h3: HTTP/3 server over the QUIC engine interface (engine.h), with nghttp3.
 *
 * Python drives it from the event loop, single-threaded: read() when the UDP fd
 * is readable, expire() when the timer fires, then it reads the event batch,
 * calls respond/send/consume/reset, and flush() once. No C callback calls Python.
 *
 * Events (fpy3_h3_events) stay valid until the next read/expire call: their
 * bytes live in a per-server arena and in stream objects whose release is
 * deferred to the start of that next call. flush() never touches the batch;
 * events it raises (a peer's STOP_SENDING seen while writing, connections it
 * closes) lead the next read/expire batch, and next_timeout_ms() is 0 until then.
 *
 * Request heads over max_header_size (sum of name + value + 32 per field, as
 * SETTINGS_MAX_FIELD_SECTION_SIZE counts) or max_header_count fields get a 431
 * response from C (and STOP_SENDING H3_NO_ERROR for any body); Python never sees
 * them. Malformed requests are reset with H3_MESSAGE_ERROR (RFC 9114 4.1.2): nghttp3's
 * checks, and what it would let through with a field dropped (a name or value with a
 * character fields may not carry), a `:path` with a fragment, a `host` other than
 * `:authority`.
 *
 * Request bodies wait in QUIC: windows start at initial_max_stream_data and
 * initial_max_data and grow (doubling, up to max_stream_window and max_window) only
 * while the app reads faster than a window per two round trips, and only while the
 * body bytes handed over and not yet consumed, worker-wide, are within unread_budget.
 *
 * Idle connections (no request stream open) past max_idle_connections are closed,
 * longest idle first, with a final GOAWAY and CONNECTION_CLOSE H3_NO_ERROR: a client
 * that vanished without closing costs memory only until then or its idle timeout.
 *
 * Deadlines: a request stream whose body (or head) makes no progress for
 * body_timeout while nothing of it waits for the app, or whose response makes no
 * progress (acknowledged bytes) for send_timeout while bytes wait for the client, is
 * reset with H3_REQUEST_CANCELLED (a RESET event tells Python).
 */
#ifndef FPY3_H3_H
#define FPY3_H3_H

#include <stddef.h>
#include <stdint.h>

#define FPY3_H3_REQUEST 1  /* head complete: data = "name\0value\0..." (pseudo first) */
#define FPY3_H3_DATA 2     /* request body bytes; consume() them to give credit back */
#define FPY3_H3_END 3      /* request body finished */
#define FPY3_H3_RESET 4    /* peer reset / stop_sending / connection lost: code set */
#define FPY3_H3_WRITABLE 5 /* unacked response bytes fell to send_high_water / 4 */
#define FPY3_H3_CLOSED 6   /* stream gone; its last event */

#define FPY3_H3_NO_ERROR 0x100
#define FPY3_H3_INTERNAL_ERROR 0x102
#define FPY3_H3_EXCESSIVE_LOAD 0x107
#define FPY3_H3_REQUEST_CANCELLED 0x10c
#define FPY3_H3_MESSAGE_ERROR 0x10e

typedef struct {
    int engine; /* FPY3_ENGINE_NGTCP2 or FPY3_ENGINE_MSQUIC */
    const char *listen_host; /* MsQuic: numeric address to listen on ("" = any) */
    int listen_port;
    const char *cert_file;
    const char *key_file;
    uint32_t worker_id;
    uint8_t static_secret[32];
    int retry;                     /* Retry always */
    uint32_t max_handshakes;       /* handshake pressure (Retry) past this many; 0 = none */
    uint64_t handshake_memory;     /* or past this many bytes in handshakes; 0 = none */
    uint64_t handshake_timeout_ms; /* 0 = 10 s */
    uint64_t max_connections;      /* more are refused (CONNECTION_REFUSED); 0 = no limit */
    uint64_t max_idle_connections; /* past it the longest idle ones are closed; 0 = no limit */
    uint64_t idle_timeout_ms;
    uint64_t max_streams_bidi;
    size_t max_udp_payload;
    uint64_t initial_max_data;
    uint64_t initial_max_stream_data;
    uint64_t max_window;        /* connection window growth limit; 0 = initial_max_data */
    uint64_t max_stream_window; /* stream window growth limit; 0 = initial_max_stream_data */
    uint64_t unread_budget;     /* windows stop growing past it; 0 = 64 MiB */
    uint64_t body_timeout_ms;   /* 0 = off */
    uint64_t send_timeout_ms;   /* 0 = off */
    size_t max_header_size;
    size_t max_header_count;
    const char *qlog_dir;   /* NULL or "" = off */
    size_t send_high_water; /* send() above it: wait for WRITABLE; 0 = 256 KiB */
    int enable_connect_protocol; /* accept :protocol on CONNECT (RFC 8441/9220) */
    /* TLS (see engine.h) */
    const char *key_password;
    const char *client_ca;
    int client_auth; /* 0 none, 1 optional, 2 required */
    int session_tickets;
    uint8_t ticket_key[64];
    uint32_t ticket_lifetime;
    int early_data;
    uint64_t close_wait_ms; /* server_free: longest wait for the engine's closes; 0 = 3 s */
} fpy3_h3_config;

typedef struct {
    int type;
    int peer_port;  /* REQUEST */
    int local_port; /* REQUEST */
    uint64_t conn;  /* connection handle */
    int64_t stream;
    const uint8_t *data;
    size_t len;
    uint64_t code;     /* RESET: HTTP/3 error code */
    const char *peer;  /* REQUEST: peer IP as text */
    const char *local; /* REQUEST: local IP as text */
    int early;         /* REQUEST: its head came in 0-RTT, before the handshake completed */
} fpy3_h3_event;

/* The TLS parameters of a connection (fpy3_tls_info in engine.h); the pointers are
 * valid until the next read/expire call. */
typedef struct {
    uint16_t tls_version;
    uint16_t cipher_suite;
    const uint8_t *certs; /* DER certificates, each after a 4-byte big-endian length */
    size_t certs_len;
    const char *cert_name;
} fpy3_h3_tls_info;

typedef struct fpy3_h3_server fpy3_h3_server;

typedef struct {
    uint64_t connections;     /* active QUIC connections */
    uint64_t handshakes;      /* of those, in their handshake */
    uint64_t handshake_bytes; /* what those hold */
    uint64_t quic_bytes;      /* what the QUIC library holds for all connections */
    uint64_t retries;         /* Retry packets sent (since the start, as all totals below) */
    uint64_t refused;         /* connections refused at max_connections */
    int pressure;             /* handshake pressure now: new clients get a Retry */
    uint64_t unread;          /* request body bytes handed to Python, not yet consumed */
    uint64_t body_timeouts;   /* streams reset: no request progress within body_timeout */
    uint64_t send_timeouts;   /* streams reset: no response progress within send_timeout */
    uint64_t malformed;       /* requests reset with H3_MESSAGE_ERROR by fpy3's own checks */
    uint64_t idle_closed;     /* idle connections closed past max_idle_connections */
} fpy3_h3_guard;

fpy3_h3_server *fpy3_h3_server_new(int fd, const fpy3_h3_config *cfg, char *err, size_t errlen);
void fpy3_h3_server_free(fpy3_h3_server *s);
int fpy3_h3_fd(fpy3_h3_server *s); /* the fd to watch: UDP socket or MsQuic's eventfd */
int fpy3_h3_read(fpy3_h3_server *s);
int fpy3_h3_expire(fpy3_h3_server *s);
int64_t fpy3_h3_next_timeout_ms(fpy3_h3_server *s);
const fpy3_h3_event *fpy3_h3_events(fpy3_h3_server *s, size_t *count);
int fpy3_h3_respond(fpy3_h3_server *s, uint64_t conn, int64_t stream, int status,
                    const char *headers, size_t len, int end_stream);
int64_t fpy3_h3_send(fpy3_h3_server *s, uint64_t conn, int64_t stream, const uint8_t *data,
                     size_t len, int fin);
/* Trailer fields ("name\0value\0...") end the body: sent after the bytes given so far. */
int fpy3_h3_trailers(fpy3_h3_server *s, uint64_t conn, int64_t stream, const char *headers,
                     size_t len);
int fpy3_h3_consume(fpy3_h3_server *s, uint64_t conn, int64_t stream, size_t n);
int fpy3_h3_reset(fpy3_h3_server *s, uint64_t conn, int64_t stream, uint64_t h3_error);
int fpy3_h3_flush(fpy3_h3_server *s); /* 0, or -1: the socket is full (want_write) */
int fpy3_h3_want_write(fpy3_h3_server *s);
/* Drain. Phase 1 stops accepting connections and sends a GOAWAY notice; phase 2
 * sends the final GOAWAY, and connections then close as their streams finish. */
void fpy3_h3_shutdown(fpy3_h3_server *s, int phase);
/* Connections that can still carry requests (those in their closing period are
 * only timers and do not count). */
size_t fpy3_h3_connection_count(fpy3_h3_server *s);
/* Closes every connection now: CONNECTION_CLOSE with h3_error (an application close,
 * e.g. FPY3_H3_NO_ERROR) goes to each client before this returns, and no new
 * connection is accepted after it. For the drain deadline and a worker's exit (also
 * right before os._exit): no client is left to find out by its idle timeout. It
 * blocks briefly: ngtcp2 waits only for a full socket (at most 200 ms); MsQuic sends
 * from its own threads, so this waits for the connections' shutdown to complete
 * (three probe timeouts, some 80 ms on loopback; at most 1 s). Streams Python knows
 * get RESET and CLOSED events in the next read/expire batch (next_timeout_ms is 0
 * until then), as after a flush. fpy3_h3_server_free does this first (H3_NO_ERROR). */
void fpy3_h3_close_all(fpy3_h3_server *s, uint64_t h3_error);
/* 0, or -1 when the connection is gone or the engine cannot tell. */
int fpy3_h3_conn_tls(fpy3_h3_server *s, uint64_t conn, fpy3_h3_tls_info *out);
/* New handshakes use these certificate files from now on (0), or -1 with err and the
 * old ones stay. */
int fpy3_h3_reload_credentials(fpy3_h3_server *s, const char *cert_file, const char *key_file,
                               const char *key_password, char *err, size_t errlen);

/* Counters for the metrics, kept since the server was made. RTT: the smoothed RTT of
 * each connection at its end, in buckets with upper bounds fpy3_h3_rtt_bounds_us
 * (the last bucket is +Inf), not cumulative. */
typedef struct {
    uint64_t handshakes; /* connections that completed their handshake */
    uint64_t lost_packets;
    uint64_t rtt_count;
    uint64_t rtt_sum_us;
    uint64_t rtt_buckets[11];
} fpy3_h3_stats;
extern const uint32_t fpy3_h3_rtt_bounds_us[10];
void fpy3_h3_get_stats(fpy3_h3_server *s, fpy3_h3_stats *out);
void fpy3_h3_guard_get(fpy3_h3_server *s, fpy3_h3_guard *out);

#endif
