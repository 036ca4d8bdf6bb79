/* ws: WebSocket framing (RFC 6455), server side, sans-I/O.
 *
 * fpy3_ws_feed() walks the complete frames in buf[start:len]: it checks each
 * header against the protocol rules, unmasks the payload in place (the caller
 * passes a writable buffer it owns), validates the UTF-8 of uncompressed text
 * messages across fragments, and checks close frames (code and reason). It
 * writes one fpy3_ws_frame per frame (payload spans into buf) and returns the
 * offset just past the last whole frame. It stops early when `frames` is full.
 *
 * On a protocol error it returns -1 with close_code/reason set; the frames
 * before the bad one are still in `frames` (nframes). After an error the
 * parser must not be fed again.
 *
 * `need` is the buffer length (from `start`) the next call needs to make
 * progress, so a caller receiving a large frame in pieces calls once.
 */
#ifndef FPY3_WS_H
#define FPY3_WS_H

#include <stddef.h>
#include <stdint.h>

#define FPY3_WS_FIN 1
#define FPY3_WS_RSV1 2

typedef struct {
    int32_t opcode;
    int32_t flags; /* FPY3_WS_FIN | FPY3_WS_RSV1 */
    int64_t start; /* payload span in buf */
    int64_t end;
} fpy3_ws_frame;

typedef struct {
    /* settings */
    uint64_t max_message; /* bytes of one (compressed) message; 0 = unlimited */
    int32_t rsv1_ok;      /* permessage-deflate was negotiated */
    int32_t require_mask; /* 1 on a server */
    /* out */
    int32_t nframes;
    int32_t close_code; /* set when feed returns -1 */
    const char *reason;
    uint64_t need;
    /* state across calls */
    int32_t msg_opcode; /* opcode of the open fragmented message; 0 = none */
    int32_t msg_rsv1;
    uint64_t msg_len;
    uint32_t utf8; /* UTF-8 validator state of the open text message */
} fpy3_ws_parser;

int64_t fpy3_ws_feed(fpy3_ws_parser *p, uint8_t *buf, size_t len, size_t start,
                     fpy3_ws_frame *frames, int32_t max_frames);

/* Validate UTF-8; returns 1 when `buf` is complete valid UTF-8 (used for text
 * that was compressed on the wire, after inflating). */
int fpy3_ws_utf8_valid(const uint8_t *buf, size_t len);

/* Unmask len bytes in place; `key` is the 4-byte mask, `phase` the offset of
 * buf[0] in the payload (mod 4). */
void fpy3_ws_unmask(uint8_t *buf, size_t len, const uint8_t *key, size_t phase);

/* Write a frame header (unmasked when mask == NULL) into out (>= 14 bytes);
 * returns its length. */
size_t fpy3_ws_header(uint8_t *out, int opcode, int flags, uint64_t len, const uint8_t *mask);

#endif
