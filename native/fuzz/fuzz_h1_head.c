/* libFuzzer target: the HTTP/1.1 request head parser (h1.c, fpy3_h1_parse_head).
 *
 * The first input byte picks the limits (max_size, max_count) and the start offset; the
 * rest is the buffer, copied to an allocation of exactly its size, and the fields
 * buffer is exactly the size h1.h demands, so ASan sees any read or write past either.
 * Beyond memory errors it checks what the Python wrapper relies on: the result's
 * bounds, the field count, and that a prefix of the input never gives a different
 * answer than None (0) or the whole input's answer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../h1.h"

static const size_t SIZES[] = {0, 1, 16, 64, 300, 8192};
static const size_t COUNTS[] = {0, 1, 3, 100};

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            __builtin_trap();                                                                      \
    } while (0)

static int64_t parse(const char *buf, size_t len, size_t start, size_t max_size, size_t max_count,
                     char *fields, size_t cap, fpy3_h1_head *out)
{
    memset(out, 0, sizeof *out);
    out->fields = fields;
    out->cap = cap;
    return fpy3_h1_parse_head(buf, len, start, max_size, max_count, out);
}

static int allowed_error(int64_t r)
{
    switch (-r) {
    case 400: case 405: case 414: case 431: case 501: case 505:
        return 1;
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
    size_t max_size = SIZES[knob % 6], max_count = COUNTS[(knob / 6) % 4];
    size_t start = (knob / 24) % 4;
    if (start > size)
        start = size;

    char *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    size_t cap = 2 * max_size + 64;
    char *fields = malloc(cap);
    fpy3_h1_head out;

    int64_t r = parse(buf, size, start, max_size, max_count, fields, cap, &out);
    if (r > 0) {
        CHECK((size_t)r <= cap);
        CHECK(out.end > (int64_t)start && out.end <= (int64_t)size);
        CHECK(out.nheaders >= 0 && (size_t)out.nheaders <= max_count);
        CHECK(out.http_minor == 0 || out.http_minor == 1);
        CHECK(out.upgrade >= -1 && out.upgrade < out.nheaders);
        /* the output holds 3 + 2 * nheaders NUL-terminated fields, then the path */
        int64_t nuls = 0;
        for (int64_t i = 0; i < r; i++)
            nuls += fields[i] == 0;
        CHECK(nuls >= 3 + 2 * out.nheaders);
        /* the head alone parses the same */
        fpy3_h1_head again;
        char *fields2 = malloc(cap);
        int64_t r2 = parse(buf, (size_t)out.end, start, max_size, max_count, fields2, cap, &again);
        CHECK(r2 == r && again.end == out.end && memcmp(fields, fields2, (size_t)r) == 0);
        free(fields2);
    } else if (r < 0) {
        CHECK(allowed_error(r) && out.reason != NULL);
    }
    /* a prefix answers "incomplete" or the same as the whole */
    if (size > start + 1) {
        size_t cut = start + 1 + (knob * 7919u) % (size - start - 1);
        fpy3_h1_head part;
        char *fields3 = malloc(cap);
        int64_t rp = parse(buf, cut, start, max_size, max_count, fields3, cap, &part);
        CHECK(rp == 0 || rp == r);
        free(fields3);
    }
    free(fields);
    free(buf);
    return 0;
}
