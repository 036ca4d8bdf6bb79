/* ws: WebSocket framing (RFC 6455), server side, sans-I/O.
 *
 * A parser owns one receive buffer (malloc'd, grown to the largest frame seen,
 * freed by fpy3_ws_parser_free or when it empties above 4 KiB). fpy3_ws_receive()
 * first drops the bytes the previous call consumed, appends `data`, then walks the
 * complete frames: it checks each header against the protocol rules, unmasks the
 * payload in place, validates the UTF-8 of uncompressed text messages across
 * fragments, and checks close frames (code and reason). For each frame it writes
 * four int64s to `frames` (opcode, flags, payload start, payload end; offsets into
 * p->buf) and returns the frame count. The spans stay valid until the next call.
 * It stops early when `frames` is full: call again with no data for the rest.
 *
 * On a protocol error it returns -1 with close_code/reason set; the frames
 * before the bad one are still in `frames` (nframes). After an error the parser
 * must not be fed again.
 */
#ifndef FPY3_WS_H
#define FPY3_WS_H

#include <stddef.h>
#include <stdint.h>

#define FPY3_WS_FIN 1
#define FPY3_WS_RSV1 2

typedef struct {
    /* settings */
    uint64_t max_message; /* bytes of one (compressed) message; 0 = unlimited */
    int32_t rsv1_ok;      /* permessage-deflate was negotiated */
    int32_t require_mask; /* 1 on a server */
    /* out */
    int32_t nframes;
    int32_t close_code; /* set when receive returns -1 */
    const char *reason;
    uint8_t *buf; /* the receive buffer; frame spans point into it */
    /* state across calls */
    size_t len, cap, consumed, need;
    int32_t msg_opcode; /* opcode of the open fragmented message; 0 = none */
    int32_t msg_rsv1;
    uint64_t msg_len;
    uint32_t utf8; /* UTF-8 validator state of the open text message */
} fpy3_ws_parser;

fpy3_ws_parser *fpy3_ws_parser_new(uint64_t max_message, int rsv1_ok);
void fpy3_ws_parser_free(fpy3_ws_parser *p);
int32_t fpy3_ws_receive(fpy3_ws_parser *p, const uint8_t *data, size_t len, int64_t *frames,
                        int32_t max_frames);

/* Validate UTF-8; returns 1 when `buf` is complete valid UTF-8 (used for text
 * that was compressed on the wire, after inflating). */
int fpy3_ws_utf8_valid(const uint8_t *buf, size_t len);

/* Unmask len bytes in place; `key` is the 4-byte mask, `phase` the offset of
 * buf[0] in the payload (mod 4). */
void fpy3_ws_unmask(uint8_t *buf, size_t len, const uint8_t *key, size_t phase);

#endif
