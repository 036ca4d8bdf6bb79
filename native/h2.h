/* h2: one HTTP/2 server session per connection, over nghttp2.
 *
 * Python owns the transport (TLS or cleartext TCP) and drives the session from the
 * event loop, single-threaded; no C callback calls Python. Each call that starts a
 * batch (recv, output, expire) invalidates the events of the last one:
 *
 *   recv(bytes)  feeds what the transport received; returns the number of events
 *                (REQUEST, DATA, END, RESET, CLOSED), or -1: the connection is
 *                broken (a protocol error, a flood, no memory); write what output()
 *                still gives (a GOAWAY) and close.
 *   output()     the bytes to write now (frames nghttp2 queued and response DATA),
 *                into a buffer C owns until the next output(); its events are
 *                WRITABLE and CLOSED (a stream whose last frame went out).
 *   expire()     resets streams whose response has been stalled by flow control
 *                longer than the send timeout (RESET and CLOSED events).
 *
 * C owns every byte: the HPACK state, request heads and body bytes of a batch (an
 * arena freed when the next batch begins), response bodies (a chain of chunks per
 * stream, until they are framed into the output buffer). Request body credit goes
 * back to the peer only through consume(), as the app reads. A failed allocation
 * fails the connection (recv/output return -1, or the call returns -1 and the
 * connection is marked broken: alive() turns 0).
 *
 * Request heads over max_header_size (name + value + 32 per field, as
 * SETTINGS_MAX_HEADER_LIST_SIZE counts) or max_header_count get a 431 from C, and
 * a declared Content-Length over max_body_size a 413; Python never sees them.
 * Malformed requests (nghttp2's HTTP messaging checks) are reset with
 * PROTOCOL_ERROR. Floods of control frames (PING, SETTINGS, PRIORITY, empty DATA,
 * WINDOW_UPDATE, RST_STREAM) are counted in a token bucket; the connection is closed
 * with ENHANCE_YOUR_CALM when it runs dry.
 */
#ifndef FPY3_H2_H
#define FPY3_H2_H

#include <stddef.h>
#include <stdint.h>

/* REQUEST: data = "method\0path\0authority\0protocol\0" (each may be empty), then the
 * regular fields "name\0value\0..."; code is 1 when a host field is among them. */
#define FPY3_H2_REQUEST 1
#define FPY3_H2_DATA 2     /* request body bytes; consume() them to give credit back */
#define FPY3_H2_END 3      /* request body finished */
#define FPY3_H2_RESET 4    /* the peer reset the stream, or it timed out: code set */
#define FPY3_H2_WRITABLE 5 /* unsent response bytes fell to send_high_water / 4 */
#define FPY3_H2_CLOSED 6   /* stream gone; its last event */

/* output() ends a round once it holds this much; Python writes it and asks again. */
#define FPY3_H2_OUT_MAX 524288

/* respond/send/trailers flags */
#define FPY3_H2_FIN 1    /* the response ends here */
#define FPY3_H2_FORGET 2 /* and Python is done with the stream: no more events for it */

#define FPY3_H2_NO_ERROR 0x0
#define FPY3_H2_PROTOCOL_ERROR 0x1
#define FPY3_H2_INTERNAL_ERROR 0x2
#define FPY3_H2_FLOW_CONTROL_ERROR 0x3
#define FPY3_H2_REFUSED_STREAM 0x7
#define FPY3_H2_CANCEL 0x8
#define FPY3_H2_ENHANCE_YOUR_CALM 0xb

typedef struct {
    uint32_t max_concurrent_streams;
    uint32_t initial_window_size;    /* per stream, SETTINGS_INITIAL_WINDOW_SIZE */
    uint32_t connection_window_size; /* the connection's receive window */
    uint32_t max_frame_size;
    size_t max_header_size; /* SETTINGS_MAX_HEADER_LIST_SIZE; larger heads get 431 */
    size_t max_header_count;
    uint64_t max_body_size; /* a declared Content-Length over it gets 413; 0 = none */
    size_t send_high_water; /* send() above it: wait for WRITABLE; 0 = 256 KiB */
    int enable_connect_protocol; /* SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441) */
    uint32_t reset_burst, reset_rate;         /* RST_STREAM token bucket (per second) */
    uint32_t control_burst, control_rate;     /* control-frame token bucket */
    uint32_t max_continuations;               /* CONTINUATION frames per header block */
} fpy3_h2_config;

typedef struct {
    int type;
    int32_t stream;
    const uint8_t *data;
    size_t len;
    uint32_t code; /* RESET: HTTP/2 error code */
} fpy3_h2_event;

typedef struct fpy3_h2_conn fpy3_h2_conn;

/* Queues the server's SETTINGS; NULL without memory. */
fpy3_h2_conn *fpy3_h2_new(const fpy3_h2_config *cfg);
void fpy3_h2_free(fpy3_h2_conn *c);
int fpy3_h2_recv(fpy3_h2_conn *c, const uint8_t *data, size_t len);
const fpy3_h2_event *fpy3_h2_events(fpy3_h2_conn *c, size_t *count);
/* The bytes to write (NULL when none; *len set), and the events in fpy3_h2_events. */
const uint8_t *fpy3_h2_output(fpy3_h2_conn *c, size_t *len);
int fpy3_h2_expire(fpy3_h2_conn *c, uint32_t send_timeout_ms);
/* A response head (fields "name\0value\0...", :status is added) and its first body
 * bytes (copied); flags FIN and FORGET. Returns the stream's unsent bytes, or -1. */
int64_t fpy3_h2_respond(fpy3_h2_conn *c, int32_t stream, int status, const char *headers,
                        size_t hlen, const uint8_t *data, size_t len, int flags);
/* Body bytes (copied); returns the stream's unsent bytes, or -1. With FIN the body
 * ends; FORGET as for respond. */
int64_t fpy3_h2_send(fpy3_h2_conn *c, int32_t stream, const uint8_t *data, size_t len, int flags);
/* Trailer fields ("name\0value\0...") end the body, after the bytes given so far;
 * flags may have FORGET. */
int fpy3_h2_trailers(fpy3_h2_conn *c, int32_t stream, const char *headers, size_t len, int flags);
int fpy3_h2_consume(fpy3_h2_conn *c, int32_t stream, size_t n);
int fpy3_h2_reset(fpy3_h2_conn *c, int32_t stream, uint32_t code);
/* Drain: phase 1 a GOAWAY notice (last stream id 2^31-1), phase 2 the final GOAWAY
 * with the last stream id processed; later streams are refused. */
void fpy3_h2_shutdown(fpy3_h2_conn *c, int phase);
/* Closes the session with GOAWAY(code) now; output() gives the frame. */
void fpy3_h2_terminate(fpy3_h2_conn *c, uint32_t code);
/* 1 while the session wants to go on reading or writing; 0: close the transport
 * after writing what output() gives. */
int fpy3_h2_alive(fpy3_h2_conn *c);
/* Streams open, and whether any has response bytes waiting for the peer's window. */
size_t fpy3_h2_open_streams(fpy3_h2_conn *c);
int fpy3_h2_want_output(fpy3_h2_conn *c);

#endif
