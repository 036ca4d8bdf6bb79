/* libFuzzer target: the websocket frame parser (ws.c, fpy3_ws_receive).
 *
 * The first input byte picks the message size limit, whether RSV1 (permessage-deflate)
 * is allowed, how the input is cut into pieces, and how many frames one call may return
 * (1 to 8). Each frame's span must lie inside the parser's buffer; the transcript of
 * frames (opcode, flags, unmasked payload) and the final error must not depend on how
 * the input was cut: the same bytes fed whole must give the same transcript. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../ws.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            __builtin_trap();                                                                      \
    } while (0)

typedef struct {
    uint8_t *bytes; /* op, flags, 4-byte length, payload; for each frame */
    size_t len, cap;
    int32_t close_code; /* 0 = no error */
} transcript;

static void put(transcript *t, const void *src, size_t n)
{
    if (t->len + n > t->cap) {
        while (t->len + n > t->cap)
            t->cap = t->cap ? 2 * t->cap : 256;
        t->bytes = realloc(t->bytes, t->cap);
        CHECK(t->bytes != NULL);
    }
    memcpy(t->bytes + t->len, src, n);
    t->len += n;
}

static void collect(fpy3_ws_parser *p, const int64_t *frames, int32_t n, transcript *t)
{
    CHECK(n == p->nframes);
    int64_t prev = 0;
    for (int32_t i = 0; i < n; i++) {
        const int64_t *f = frames + 4 * i;
        CHECK(f[0] <= 2 || (f[0] >= 8 && f[0] <= 10));
        CHECK((f[1] & ~(int64_t)(FPY3_WS_FIN | FPY3_WS_RSV1)) == 0);
        CHECK(f[2] >= prev && f[2] <= f[3] && (size_t)f[3] <= p->len);
        prev = f[3];
        uint8_t head[6] = {(uint8_t)f[0], (uint8_t)f[1]};
        uint32_t plen = (uint32_t)(f[3] - f[2]);
        memcpy(head + 2, &plen, 4);
        put(t, head, sizeof head);
        if (plen)
            put(t, p->buf + f[2], plen);
    }
}

static void run(const uint8_t *data, size_t size, uint64_t max_message, int rsv1_ok, size_t step,
                int32_t max_frames, transcript *t)
{
    fpy3_ws_parser *p = fpy3_ws_parser_new(max_message, rsv1_ok);
    CHECK(p != NULL);
    int64_t frames[4 * 8];
    size_t pos = 0;
    while (pos < size && !t->close_code) {
        size_t len = size - pos < step ? size - pos : step;
        uint8_t *piece = malloc(len);
        memcpy(piece, data + pos, len);
        pos += len;
        int32_t n = fpy3_ws_receive(p, piece, len, frames, max_frames);
        free(piece);
        for (;;) {
            if (n < 0) {
                CHECK(n == -1 && p->reason != NULL && p->close_code >= 1002);
                collect(p, frames, p->nframes, t);
                t->close_code = p->close_code;
                break;
            }
            collect(p, frames, n, t);
            if (n < max_frames)
                break;
            n = fpy3_ws_receive(p, NULL, 0, frames, max_frames);
        }
    }
    fpy3_ws_parser_free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t knob = data[0];
    data++;
    size--;
    static const uint64_t LIMITS[] = {0, 1, 125, 4096};
    uint64_t max_message = LIMITS[knob & 3];
    int rsv1_ok = (knob >> 2) & 1;
    size_t step = 1 + ((knob >> 3) & 15) * 3;
    int32_t max_frames = 1 + (knob >> 7) * 7;
    transcript a = {0}, b = {0};
    run(data, size, max_message, rsv1_ok, step, max_frames, &a);
    run(data, size, max_message, rsv1_ok, size ? size : 1, 8, &b);
    CHECK(a.close_code == b.close_code);
    CHECK(a.len == b.len && (a.len == 0 || memcmp(a.bytes, b.bytes, a.len) == 0));
    /* the helpers on arbitrary bytes */
    (void)fpy3_ws_utf8_valid(data, size);
    if (size >= 4) {
        uint8_t *copy = malloc(size);
        memcpy(copy, data, size);
        fpy3_ws_unmask(copy + 4, size - 4, copy, knob & 3);
        fpy3_ws_unmask(copy + 4, size - 4, copy, knob & 3);
        CHECK(memcmp(copy, data, size) == 0);
        free(copy);
    }
    free(a.bytes);
    free(b.bytes);
    return 0;
}
