/* h1: strict HTTP/1.1 request head parser and chunked body decoder (sans-I/O).
 * Python calls each function once per head / per received buffer; nothing here
 * allocates or keeps pointers into the caller's buffers between calls. */
#ifndef FPY3_H1_H
#define FPY3_H1_H

#include <stddef.h>
#include <stdint.h>

#define FPY3_H1_KEEP_ALIVE 1
#define FPY3_H1_CHUNKED 2
#define FPY3_H1_EXPECT_CONTINUE 4
#define FPY3_H1_UPGRADE 8

/* Integer results of one parsed head. All int64_t so Python can read them with
 * one ffi.unpack over the first six fields. */
typedef struct {
    int64_t end;            /* offset just past the blank line ending the head */
    int64_t http_minor;     /* 0 or 1 (HTTP/1.2 and up are read as 1.1) */
    int64_t nheaders;
    int64_t content_length; /* -1 when absent */
    int64_t flags;          /* FPY3_H1_* bits */
    int64_t upgrade;        /* header index of Upgrade when upgrading, else -1 */
    const char *reason;     /* static text, set when an error is returned */
    char *fields;           /* caller's output buffer; fewer call arguments make the call cheaper */
    size_t cap;             /* its size: must be >= 2 * max_size + 64 */
} fpy3_h1_head;

/* Parses the request head at buf[start:len].
 * Returns > 0: bytes written to out->fields:
 *   method \0 raw_path \0 query \0 (name \0 value \0)* path
 *   names lowercased, path percent-decoded and last (it may hold a NUL byte); for an
 *   absolute-form target, a host field carrying its authority replaces Host.
 * Returns 0: head incomplete. Returns < 0: -(HTTP status); out->reason says why. */
int64_t fpy3_h1_parse_head(const char *buf, size_t len, size_t start, size_t max_size,
                           size_t max_count, fpy3_h1_head *out);

/* Chunked transfer-coding decoder state; zero-initialised means "before the first chunk". */
typedef struct {
    int32_t nspans;     /* data spans written by the last call */
    int32_t done;       /* 1 once the final CRLF after the trailers was consumed */
    const char *reason; /* static text, set when an error is returned */
    uint64_t remaining; /* chunk size being read, then data bytes left in the chunk */
    uint32_t state;
    uint32_t count;     /* digits of the size, or bytes of extension / trailer section */
} fpy3_h1_chunked;

/* Decodes buf[start:len]. Writes up to max_spans (begin, end) offset pairs of body
 * data into spans. Returns the offset where decoding stopped (all input consumed,
 * the body ended, or spans is full), or -400 on malformed input. */
int64_t fpy3_h1_chunked_feed(fpy3_h1_chunked *st, const char *buf, size_t len, size_t start,
                             int64_t *spans, int32_t max_spans);

#endif
