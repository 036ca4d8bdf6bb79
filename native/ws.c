/* WebSocket framing: see ws.h. */
#include "ws.h"

#include <stdlib.h>
#include <string.h>

/* --- UTF-8 ---------------------------------------------------------------------------
 * state = continuation bytes still needed (low byte) | lowest allowed next byte << 8
 * | highest << 16; 0 = between characters. Only a sequence's first continuation byte
 * has narrowed bounds (no overlongs, no surrogates, nothing above U+10FFFF). */

#define CONT(n, lo, hi) ((uint32_t)(n) | ((uint32_t)(lo) << 8) | ((uint32_t)(hi) << 16))

static int utf8_run(uint32_t *state, const uint8_t *s, size_t n)
{
    uint32_t st = *state;
    size_t i = 0;
    while (i < n) {
        if (st == 0) {
            while (i + 8 <= n) {
                uint64_t w;
                memcpy(&w, s + i, 8);
                if (w & 0x8080808080808080ULL)
                    break;
                i += 8;
            }
            if (i >= n)
                break;
            uint8_t c = s[i++];
            if (c < 0x80)
                continue;
            if (c < 0xC2)
                return -1;
            if (c < 0xE0)
                st = CONT(1, 0x80, 0xBF);
            else if (c < 0xF0)
                st = CONT(2, c == 0xE0 ? 0xA0 : 0x80, c == 0xED ? 0x9F : 0xBF);
            else if (c < 0xF5)
                st = CONT(3, c == 0xF0 ? 0x90 : 0x80, c == 0xF4 ? 0x8F : 0xBF);
            else
                return -1;
        } else {
            uint8_t c = s[i++];
            if (c < ((st >> 8) & 0xFF) || c > ((st >> 16) & 0xFF))
                return -1;
            st = (st & 0xFF) - 1;
            if (st)
                st = CONT(st, 0x80, 0xBF);
        }
    }
    *state = st;
    return 0;
}

int fpy3_ws_utf8_valid(const uint8_t *buf, size_t len)
{
    uint32_t st = 0;
    return utf8_run(&st, buf, len) == 0 && st == 0;
}

/* --- masking ---------------------------------------------------------------------- */

void fpy3_ws_unmask(uint8_t *buf, size_t len, const uint8_t *key, size_t phase)
{
    uint8_t k[8];
    for (int i = 0; i < 8; i++)
        k[i] = key[(phase + (size_t)i) & 3];
    uint64_t m;
    memcpy(&m, k, 8);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, buf + i, 8);
        w ^= m;
        memcpy(buf + i, &w, 8);
    }
    for (; i < len; i++)
        buf[i] ^= k[i & 7];
}

/* --- frames ------------------------------------------------------------------------- */

/* Close codes a peer may send (RFC 6455 7.4, the IANA registry, 3000-4999 for
 * libraries and applications). 1004-1006 and 1015 must never be on the wire. */
static int close_code_ok(unsigned code)
{
    if (code >= 3000 && code <= 4999)
        return 1;
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014);
}

#define FAIL(code, why)                                                                        \
    do {                                                                                       \
        p->close_code = (code);                                                                \
        p->reason = (why);                                                                     \
        return -1;                                                                             \
    } while (0)

fpy3_ws_parser *fpy3_ws_parser_new(uint64_t max_message, int rsv1_ok)
{
    fpy3_ws_parser *p = calloc(1, sizeof *p);
    if (p) {
        p->max_message = max_message;
        p->rsv1_ok = rsv1_ok;
        p->require_mask = 1;
    }
    return p;
}

void fpy3_ws_parser_free(fpy3_ws_parser *p)
{
    if (p) {
        free(p->buf);
        free(p);
    }
}

#define KEEP_CAP 4096 /* an emptied buffer above this is freed */

/* Drop what the last call consumed and append data; -1 on allocation failure. */
static int take(fpy3_ws_parser *p, const uint8_t *data, size_t len)
{
    if (p->consumed) {
        p->len -= p->consumed;
        if (p->len)
            memmove(p->buf, p->buf + p->consumed, p->len);
        p->consumed = 0;
        if (!p->len && p->cap > KEEP_CAP) {
            free(p->buf);
            p->buf = NULL;
            p->cap = 0;
        }
    }
    if (!len)
        return 0;
    if (p->len + len > p->cap) {
        size_t cap = p->cap ? p->cap : KEEP_CAP;
        while (cap < p->len + len)
            cap *= 2;
        uint8_t *nb = realloc(p->buf, cap);
        if (!nb)
            return -1;
        p->buf = nb;
        p->cap = cap;
    }
    memcpy(p->buf + p->len, data, len);
    p->len += len;
    return 0;
}

int32_t fpy3_ws_receive(fpy3_ws_parser *p, const uint8_t *data, size_t len, int64_t *frames,
                        int32_t max_frames)
{
    p->nframes = 0;
    if (take(p, data, len) < 0)
        FAIL(1011, "out of memory");
    if (p->len < p->need)
        return 0;
    uint8_t *buf = p->buf;
    size_t pos = 0;
    p->need = 0;
    while (p->nframes < max_frames) {
        size_t avail = p->len - pos;
        if (avail < 2) {
            p->need = 2;
            break;
        }
        const uint8_t b0 = buf[pos], b1 = buf[pos + 1];
        const int fin = b0 & 0x80, rsv1 = b0 & 0x40, op = b0 & 0x0F, masked = b1 & 0x80;
        uint64_t plen = b1 & 0x7F;
        size_t hl = plen == 126 ? 4 : plen == 127 ? 10 : 2;
        if (masked)
            hl += 4;
        if (avail < hl) {
            p->need = hl;
            break;
        }
        if (plen == 126) {
            plen = (uint64_t)buf[pos + 2] << 8 | buf[pos + 3];
        } else if (plen == 127) {
            plen = 0;
            for (int i = 0; i < 8; i++)
                plen = plen << 8 | buf[pos + 2 + i];
            if (plen >> 63)
                FAIL(1002, "frame length with the most significant bit set");
        }
        if (b0 & 0x30)
            FAIL(1002, "RSV2 or RSV3 set without an extension");
        if (op >= 8) {
            if (op > 10)
                FAIL(1002, "reserved control opcode");
            if (!fin)
                FAIL(1002, "fragmented control frame");
            if (plen > 125)
                FAIL(1002, "control frame payload over 125 bytes");
            if (rsv1)
                FAIL(1002, "RSV1 set on a control frame");
        } else if (op == 0) {
            if (!p->msg_opcode)
                FAIL(1002, "continuation frame outside a fragmented message");
            if (rsv1)
                FAIL(1002, "RSV1 set on a continuation frame");
        } else if (op <= 2) {
            if (p->msg_opcode)
                FAIL(1002, "new data frame inside a fragmented message");
            if (rsv1 && !p->rsv1_ok)
                FAIL(1002, "RSV1 set without a negotiated extension");
        } else {
            FAIL(1002, "reserved data opcode");
        }
        if (!masked && p->require_mask)
            FAIL(1002, "unmasked client frame");
        if (op < 8 && p->max_message && (op ? 0 : p->msg_len) + plen > p->max_message)
            FAIL(1009, "message larger than websocket.max_message_size");
        if (avail - hl < plen) {
            p->need = hl + plen;
            break;
        }
        uint8_t *pay = buf + pos + hl;
        if (masked)
            fpy3_ws_unmask(pay, plen, pay - 4, 0);
        if (op == 1 || op == 2) {
            p->msg_opcode = op;
            p->msg_rsv1 = rsv1 != 0;
            p->msg_len = 0;
            p->utf8 = 0;
        }
        if (op < 8) {
            p->msg_len += plen;
            if (p->msg_opcode == 1 && !p->msg_rsv1) {
                if (utf8_run(&p->utf8, pay, plen) < 0)
                    FAIL(1007, "invalid UTF-8 in a text message");
                if (fin && p->utf8)
                    FAIL(1007, "text message ends inside a UTF-8 sequence");
            }
            if (fin)
                p->msg_opcode = 0;
        } else if (op == 8 && plen) {
            if (plen == 1)
                FAIL(1002, "close frame with a 1-byte payload");
            if (!close_code_ok((unsigned)pay[0] << 8 | pay[1]))
                FAIL(1002, "invalid close code");
            if (!fpy3_ws_utf8_valid(pay + 2, plen - 2))
                FAIL(1007, "close reason is not valid UTF-8");
        }
        int64_t *f = frames + 4 * p->nframes++;
        f[0] = op;
        f[1] = (fin ? FPY3_WS_FIN : 0) | (rsv1 ? FPY3_WS_RSV1 : 0);
        f[2] = (int64_t)(pos + hl);
        f[3] = (int64_t)(pos + hl + plen);
        pos += hl + plen;
    }
    p->consumed = pos;
    /* need counts from the first unconsumed byte, which the next call moves to 0. */
    return p->nframes;
}
