/* libFuzzer target: the chunked transfer-coding decoder (h1.c, fpy3_h1_chunked_feed).
 *
 * The first input byte picks how the body is cut into pieces and how many spans each
 * call may return (1 to 8, so the early stop on a full span array is exercised); each
 * piece is fed from its own exact-size allocation, carrying unconsumed bytes over as
 * the Python wrapper does. Checks: spans lie inside the piece, in order, and never
 * overlap; consumption never goes backwards; the decoded data equals what a second
 * decoder fed the whole body at once produces. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../h1.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            __builtin_trap();                                                                      \
    } while (0)

/* Decodes data[0:size] in pieces of at most `step` bytes; appends the body to out.
 * Returns 1 when done, 0 when input ran out, -1 on a decoding error. The decoder
 * consumes every piece whole (it keeps partial sizes and lines in its state) unless
 * the body ends or its span array fills, so nothing is carried over. */
static int decode(const uint8_t *data, size_t size, size_t step, int32_t max_spans, uint8_t *out,
                  size_t *outlen)
{
    fpy3_h1_chunked st;
    memset(&st, 0, sizeof st);
    int64_t spans[32];
    size_t pos = 0;
    while (pos < size) {
        size_t len = size - pos < step ? size - pos : step;
        char *buf = malloc(len);
        memcpy(buf, data + pos, len);
        pos += len;
        size_t start = 0;
        int result = 0;
        for (;;) {
            int64_t r = fpy3_h1_chunked_feed(&st, buf, len, start, spans, max_spans);
            if (r < 0) {
                CHECK(r == -400 && st.reason != NULL);
                result = -1;
                break;
            }
            CHECK((size_t)r >= start && (size_t)r <= len);
            CHECK(st.nspans >= 0 && st.nspans <= max_spans);
            int64_t prev = (int64_t)start;
            for (int32_t i = 0; i < st.nspans; i++) {
                int64_t b = spans[2 * i], e = spans[2 * i + 1];
                CHECK(b >= prev && e > b && e <= r);
                memcpy(out + *outlen, buf + b, (size_t)(e - b));
                *outlen += (size_t)(e - b);
                prev = e;
            }
            if (st.done) {
                result = 1;
                break;
            }
            if ((size_t)r == len)
                break;
            /* stopped early: only a full span array may do that */
            CHECK(st.nspans == max_spans);
            start = (size_t)r;
        }
        free(buf);
        if (result)
            return result;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t knob = data[0];
    data++;
    size--;
    size_t step = 1 + (knob & 31);
    int32_t max_spans = 1 + ((knob >> 5) & 7);
    uint8_t *a = malloc(size + 1), *b = malloc(size + 1);
    size_t alen = 0, blen = 0;
    int ra = decode(data, size, step, max_spans, a, &alen);
    int rb = decode(data, size, size ? size : 1, 16, b, &blen);
    CHECK(alen <= size && blen <= size);
    if (ra == 1 && rb == 1) {
        CHECK(alen == blen && memcmp(a, b, alen) == 0);
    } else {
        /* the outcome does not depend on how the input is cut */
        CHECK(ra == rb);
        size_t n = alen < blen ? alen : blen;
        CHECK(memcmp(a, b, n) == 0);
    }
    free(a);
    free(b);
    return 0;
}
