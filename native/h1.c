/* h1: strict HTTP/1.1 request parser (RFC 9110 / RFC 9112), see h1.h. */
#include "h1.h"

#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* Character classes. */
#define C_TOK 1 /* tchar */
#define C_VAL 2 /* field-value byte: VCHAR, obs-text, SP, HTAB */
#define C_TGT 4 /* request-target byte: VCHAR, obs-text */
#define C_HEX 8
#define C_HOST 16 /* reg-name byte other than "%": unreserved / sub-delims */

#define VT (C_VAL | C_TGT)
#define TVT (C_TOK | C_VAL | C_TGT)
#define HTVT (C_HEX | TVT)
#define H (C_HOST)

/* Ranges do not overlap: some compilers warn on overridden initialisers. */
static const uint8_t cls[256] = {
    ['\t'] = C_VAL,          [' '] = C_VAL,           ['!'] = TVT | H,        ['"'] = VT,
    ['#'] = TVT,             ['$'] = TVT | H,         ['%'] = TVT,            ['&' ... '\''] = TVT | H,
    ['(' ... ')'] = VT | H,  ['*' ... '+'] = TVT | H, [','] = VT | H,         ['-' ... '.'] = TVT | H,
    ['/'] = VT,              ['0' ... '9'] = HTVT | H, [':'] = VT,            [';'] = VT | H,
    ['<'] = VT,              ['='] = VT | H,          ['>' ... '@'] = VT,     ['A' ... 'F'] = HTVT | H,
    ['G' ... 'Z'] = TVT | H, ['[' ... ']'] = VT,      ['^'] = TVT,            ['_'] = TVT | H,
    ['`'] = TVT,             ['a' ... 'f'] = HTVT | H, ['g' ... 'z'] = TVT | H, ['{'] = VT,
    ['|'] = TVT,             ['}'] = VT,              ['~'] = TVT | H,        [0x80 ... 0xff] = VT,
};

static inline unsigned hexval(uint8_t c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; }

static inline uint8_t lower(uint8_t c) { return c + ((unsigned)(c - 'A') < 26u ? 32 : 0); }

/* ASCII case-insensitive compare of s[0:n] with a lowercase literal of length n. */
static int ieq(const uint8_t *s, const char *lit, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (lower(s[i]) != (uint8_t)lit[i])
            return 0;
    return 1;
}

static inline int ows(uint8_t c) { return c == ' ' || c == '\t'; }

/* First byte in [p, lim) that is not a field-value byte (VCHAR, obs-text, SP, HTAB).
 * Values are most of a head, so they are scanned 16 bytes at a time. */
static inline const uint8_t *scan_value(const uint8_t *p, const uint8_t *lim)
{
#ifdef __SSE2__
    const __m128i sp = _mm_set1_epi8(0x20), tab = _mm_set1_epi8('\t'), del = _mm_set1_epi8(0x7f);
    while (lim - p >= 16) {
        __m128i c = _mm_loadu_si128((const __m128i *)p);
        __m128i ok = _mm_cmpeq_epi8(_mm_max_epu8(c, sp), c); /* c >= 0x20 */
        ok = _mm_or_si128(ok, _mm_cmpeq_epi8(c, tab));
        ok = _mm_andnot_si128(_mm_cmpeq_epi8(c, del), ok);
        unsigned bad = ~(unsigned)_mm_movemask_epi8(ok) & 0xffff;
        if (bad)
            return p + __builtin_ctz(bad);
        p += 16;
    }
#endif
    while (p < lim && (cls[*p] & C_VAL))
        p++;
    return p;
}

/* Same for request-target bytes (VCHAR, obs-text). */
static inline const uint8_t *scan_target(const uint8_t *p, const uint8_t *lim)
{
#ifdef __SSE2__
    const __m128i bang = _mm_set1_epi8(0x21), del = _mm_set1_epi8(0x7f);
    while (lim - p >= 16) {
        __m128i c = _mm_loadu_si128((const __m128i *)p);
        __m128i ok = _mm_cmpeq_epi8(_mm_max_epu8(c, bang), c); /* c >= 0x21 */
        ok = _mm_andnot_si128(_mm_cmpeq_epi8(c, del), ok);
        unsigned bad = ~(unsigned)_mm_movemask_epi8(ok) & 0xffff;
        if (bad)
            return p + __builtin_ctz(bad);
        p += 16;
    }
#endif
    while (p < lim && (cls[*p] & C_TGT))
        p++;
    return p;
}

#define CONN_CLOSE 1
#define CONN_KEEP_ALIVE 2
#define CONN_UPGRADE 4

/* Connection = #connection-option; returns the CONN_* bits of the known options. */
static int connection_tokens(const uint8_t *s, size_t n)
{
    const uint8_t *e = s + n;
    int bits = 0;
    while (s < e) {
        while (s < e && (*s == ',' || ows(*s)))
            s++;
        const uint8_t *t = s;
        while (s < e && *s != ',')
            s++;
        const uint8_t *te = s;
        while (te > t && ows(te[-1]))
            te--;
        size_t tl = te - t;
        if (tl == 5 && ieq(t, "close", 5))
            bits |= CONN_CLOSE;
        else if (tl == 10 && ieq(t, "keep-alive", 10))
            bits |= CONN_KEEP_ALIVE;
        else if (tl == 7 && ieq(t, "upgrade", 7))
            bits |= CONN_UPGRADE;
    }
    return bits;
}

/* authority-form = uri-host ":" port (RFC 9112 3.2.3). */
static int authority_ok(const uint8_t *s, size_t n)
{
    const uint8_t *colon = NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '/' || s[i] == '?' || s[i] == '@')
            return 0;
        if (s[i] == ':')
            colon = s + i;
    }
    if (!colon || colon == s)
        return 0;
    size_t plen = s + n - colon - 1;
    if (plen == 0 || plen > 5)
        return 0;
    for (size_t i = 1; i <= plen; i++)
        if (colon[i] < '0' || colon[i] > '9')
            return 0;
    return 1;
}

/* uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): IP-literal, IPv4address or
 * reg-name (unreserved / pct-encoded / sub-delims, possibly empty), then an optional
 * port of digits. Userinfo ("@"), "/", "?", "#", spaces and controls are invalid. */
static int host_ok(const uint8_t *s, size_t n)
{
    const uint8_t *e = s + n, *p = s;
    if (p < e && *p == '[') {
        /* IP-literal: IPv6address or IPvFuture; hex digits, ":" and "." cover IPv6 */
        p++;
        if (p < e && (*p == 'v' || *p == 'V')) {
            p++;
            while (p < e && *p != ']' && ((cls[*p] & C_HOST) || *p == ':'))
                p++;
        } else {
            while (p < e && ((cls[*p] & C_HEX) || *p == ':' || *p == '.'))
                p++;
        }
        if (p == e || *p != ']' || p - s < 3)
            return 0;
        p++;
    } else {
        while (p < e && *p != ':') {
            if (*p == '%') {
                if (e - p < 3 || !(cls[p[1]] & C_HEX) || !(cls[p[2]] & C_HEX))
                    return 0;
                p += 3;
            } else if (cls[*p] & C_HOST) {
                p++;
            } else {
                return 0;
            }
        }
    }
    if (p == e)
        return 1;
    if (*p != ':')
        return 0;
    for (p++; p < e; p++)
        if (*p < '0' || *p > '9')
            return 0;
    return 1;
}

/* Transfer-Encoding = #transfer-coding (RFC 9112 6.1). Returns 0 when chunked is the
 * final coding and the only one, else -(status) with *why set: chunked missing from the
 * end, or applied twice, is 400 (the body length cannot be known); other codings before
 * chunked are valid but not implemented, 501. */
static int transfer_codings(const uint8_t *s, size_t n, const char **why)
{
    const uint8_t *e = s + n, *last = NULL;
    size_t last_len = 0, count = 0, chunked = 0;
    while (s < e) {
        while (s < e && (*s == ',' || ows(*s)))
            s++;
        if (s == e)
            break;
        const uint8_t *t = s;
        while (s < e && *s != ',')
            s++;
        const uint8_t *te = s;
        while (te > t && ows(te[-1]))
            te--;
        count++;
        last = t;
        last_len = te - t;
        if (last_len == 7 && ieq(t, "chunked", 7))
            chunked++;
    }
    if (count == 0) {
        *why = "empty Transfer-Encoding";
        return -400;
    }
    if (!(last_len == 7 && ieq(last, "chunked", 7))) {
        *why = "chunked is not the final transfer coding";
        return -400;
    }
    if (chunked > 1) {
        *why = "chunked applied more than once";
        return -400;
    }
    if (count > 1) {
        *why = "unsupported transfer coding";
        return -501;
    }
    return 0;
}

/* %XX -> byte; invalid sequences are copied unchanged. Never writes more than n bytes. */
static char *pct_decode(char *w, const uint8_t *s, size_t n)
{
    const uint8_t *e = s + n;
    while (s < e) {
        const uint8_t *pc = memchr(s, '%', e - s);
        if (!pc) {
            memcpy(w, s, e - s);
            return w + (e - s);
        }
        memcpy(w, s, pc - s);
        w += pc - s;
        s = pc;
        if (e - s >= 3 && (cls[s[1]] & C_HEX) && (cls[s[2]] & C_HEX)) {
            *w++ = (char)(hexval(s[1]) << 4 | hexval(s[2]));
            s += 3;
        } else {
            *w++ = '%';
            s++;
        }
    }
    return w;
}

#define ERR(status, why)                                                                           \
    do {                                                                                           \
        out->reason = (why);                                                                       \
        return -(status);                                                                          \
    } while (0)

int64_t fpy3_h1_parse_head(const char *buf, size_t len, size_t start, size_t max_size,
                           size_t max_count, fpy3_h1_head *out)
{
    const uint8_t *base = (const uint8_t *)buf, *end = base + len, *p;
    char *w = out->fields;
    int in_request_line = 1;

    /* Output is at most head + path + authority + 8 bytes (the authority of an
     * absolute-form target replaces one Host value, or is added as one), which is at
     * most 2 * max_size + 8: no write below needs a bound check. */
    if (max_size > (SIZE_MAX - 64) / 2 || out->cap < 2 * max_size + 64)
        ERR(500, "parser output buffer too small");
    if (start > len)
        ERR(500, "start beyond buffer");
    p = base + start;

    /* RFC 9112 2.2: ignore empty lines before the request line (bounded). */
    while (p < end && (*p == '\r' || *p == '\n')) {
        if (*p == '\n')
            ERR(400, "bare LF");
        if (p + 1 == end)
            return 0;
        if (p[1] != '\n')
            ERR(400, "bare CR");
        p += 2;
        if ((size_t)(p - base - start) > max_size)
            ERR(400, "too many empty lines before request line");
    }

    /* Scan at most max_size bytes: running out before end means too large. */
    const uint8_t *rl = p;
    const uint8_t *lim = (size_t)(end - rl) > max_size ? rl + max_size : end;

    /* method SP */
    const uint8_t *m = p;
    while (p < lim && (cls[*p] & C_TOK))
        p++;
    if (p == lim)
        goto more;
    if (*p != ' ' || p == m)
        ERR(400, "invalid method");
    size_t mlen = p - m;

    /* request-target SP */
    const uint8_t *t = ++p;
    p = scan_target(p, lim);
    if (p == lim)
        goto more;
    if (*p != ' ' || p == t)
        ERR(400, "invalid request target");
    size_t tlen = p - t;

    /* HTTP-version CRLF */
    const uint8_t *v = ++p;
    while (p < lim && (cls[*p] & C_TGT))
        p++;
    if (p == lim)
        goto more;
    if (*p != '\r')
        ERR(400, "invalid HTTP version");
    if (p + 1 == lim)
        goto more;
    if (p[1] != '\n')
        ERR(400, "bare CR");
    size_t vlen = p - v;
    int minor;
    /* RFC 9110 6.2: a 1.x request with a higher minor is served as HTTP/1.1 */
    if (vlen == 8 && memcmp(v, "HTTP/1.", 7) == 0 && v[7] >= '0' && v[7] <= '9')
        minor = v[7] != '0';
    else if (vlen == 8 && memcmp(v, "HTTP/", 5) == 0 && v[5] >= '0' && v[5] <= '9' &&
             v[6] == '.' && v[7] >= '0' && v[7] <= '9')
        ERR(505, "HTTP version not supported");
    else
        ERR(400, "invalid HTTP version");
    p += 2;
    in_request_line = 0;

    /* request-target forms (RFC 9112 3.2) -> raw path, query */
    if (memchr(t, '#', tlen))
        ERR(400, "fragment in request target");
    const uint8_t *rp = t, *q = t + tlen, *te = t + tlen;
    const uint8_t *auth = NULL; /* absolute-form: its authority replaces Host */
    size_t alen = 0;
    int connect = mlen == 7 && memcmp(m, "CONNECT", 7) == 0;
    if (connect) {
        if (!authority_ok(t, tlen))
            ERR(400, "CONNECT needs an authority-form target");
        rp = t;
    } else if (t[0] == '/') {
        const uint8_t *qm = memchr(t, '?', tlen);
        if (qm)
            q = qm;
    } else if (tlen == 1 && t[0] == '*') {
        if (!(mlen == 7 && memcmp(m, "OPTIONS", 7) == 0))
            ERR(400, "asterisk-form is only for OPTIONS");
    } else {
        size_t skip;
        if (tlen >= 7 && ieq(t, "http://", 7))
            skip = 7;
        else if (tlen >= 8 && ieq(t, "https://", 8))
            skip = 8;
        else
            ERR(400, "invalid request target");
        const uint8_t *a = t + skip;
        rp = a;
        while (rp < te && *rp != '/' && *rp != '?')
            rp++;
        if (rp == a || *a == ':')
            ERR(400, "empty host in absolute-form target");
        if (!host_ok(a, rp - a))
            ERR(400, "invalid authority in absolute-form target");
        auth = a;
        alen = rp - a;
        const uint8_t *qm = memchr(rp, '?', te - rp);
        if (qm)
            q = qm;
    }
    size_t rplen = q - rp;
    memcpy(w, m, mlen);
    w += mlen;
    *w++ = 0;
    if (rplen == 0) /* absolute-form with an empty path */
        *w++ = '/';
    memcpy(w, rp, rplen);
    w += rplen;
    *w++ = 0;
    size_t qlen = q < te ? te - q - 1 : 0;
    if (qlen)
        memcpy(w, q + 1, qlen);
    w += qlen;
    *w++ = 0;

    /* header fields */
    size_t nh = 0, nhost = 0, ncl = 0, nte = 0;
    const uint8_t *clv = NULL, *tev = NULL, *hostv = NULL;
    size_t cllen = 0, telen = 0, hostlen = 0;
    int conn = 0, expect = 0;
    int64_t upgrade = -1;
    for (;;) {
        if (p == lim)
            goto more;
        if (*p == '\r') {
            if (p + 1 == lim)
                goto more;
            if (p[1] != '\n')
                ERR(400, "bare CR");
            p += 2;
            break;
        }
        const uint8_t *n = p;
        while (p < lim && (cls[*p] & C_TOK))
            p++;
        if (p == lim)
            goto more;
        if (*p != ':' || p == n) {
            if (p == n && ows(*p))
                ERR(400, "obsolete line folding or whitespace before field name");
            if (p == n && *p == '\n')
                ERR(400, "bare LF");
            ERR(400, "invalid header field name");
        }
        size_t nlen = p - n;
        p++;
        while (p < lim && ows(*p))
            p++;
        const uint8_t *vs = p;
        p = scan_value(p, lim);
        if (p == lim)
            goto more;
        if (*p != '\r')
            ERR(400, *p == '\n' ? "bare LF" : "invalid character in header value");
        if (p + 1 == lim)
            goto more;
        if (p[1] != '\n')
            ERR(400, "bare CR");
        const uint8_t *ve = p;
        while (ve > vs && ows(ve[-1]))
            ve--;
        size_t vlen2 = ve - vs;
        p += 2;
        if (++nh > max_count)
            ERR(431, "too many header fields");

        char *wn = w;
        for (size_t i = 0; i < nlen; i++)
            w[i] = (char)lower(n[i]);
        w += nlen;
        *w++ = 0;
        memcpy(w, vs, vlen2);
        w += vlen2;
        *w++ = 0;

        switch (nlen) {
        case 4:
            if (memcmp(wn, "host", 4) == 0 && ++nhost == 1) {
                hostv = vs;
                hostlen = vlen2;
                if (auth) {
                    /* Only the first: each copy costs alen bytes of the output buffer. */
                    w = wn + 5;
                    memcpy(w, auth, alen);
                    w += alen;
                    *w++ = 0;
                }
            }
            break;
        case 6:
            if (memcmp(wn, "expect", 6) == 0 && vlen2 == 12 && ieq(vs, "100-continue", 12))
                expect = 1;
            break;
        case 7:
            if (memcmp(wn, "upgrade", 7) == 0 && upgrade < 0)
                upgrade = (int64_t)nh - 1;
            break;
        case 10:
            if (memcmp(wn, "connection", 10) == 0)
                conn |= connection_tokens(vs, vlen2);
            break;
        case 14:
            if (memcmp(wn, "content-length", 14) == 0) {
                ncl++;
                clv = vs;
                cllen = vlen2;
            }
            break;
        case 17:
            if (memcmp(wn, "transfer-encoding", 17) == 0) {
                nte++;
                tev = vs;
                telen = vlen2;
            }
            break;
        }
    }

    /* message framing and connection semantics */
    if (nhost > 1)
        ERR(400, "multiple Host headers");
    if (minor == 1 && nhost == 0)
        ERR(400, "missing Host header");
    /* RFC 9112 3.2: 400 for an invalid Host, even when the target's authority replaces it */
    if (nhost && !host_ok(hostv, hostlen))
        ERR(400, "invalid Host header");
    int64_t cl = -1;
    if (ncl > 1)
        ERR(400, "multiple Content-Length headers");
    if (ncl) {
        if (cllen == 0)
            ERR(400, "invalid Content-Length");
        cl = 0;
        for (size_t i = 0; i < cllen; i++) {
            unsigned d = clv[i] - '0';
            if (d > 9)
                ERR(400, "invalid Content-Length");
            if (cl > (INT64_MAX - (int64_t)d) / 10)
                ERR(400, "Content-Length too large");
            cl = cl * 10 + d;
        }
    }
    int64_t flags = 0;
    if (nte) {
        if (minor == 0)
            ERR(400, "Transfer-Encoding in an HTTP/1.0 request");
        if (nte > 1)
            ERR(400, "multiple Transfer-Encoding headers");
        if (ncl)
            ERR(400, "both Transfer-Encoding and Content-Length");
        const char *why = NULL;
        int st = transfer_codings(tev, telen, &why);
        if (st)
            ERR(-st, why);
        flags |= FPY3_H1_CHUNKED;
    }
    if (minor == 1 ? !(conn & CONN_CLOSE) : (conn & (CONN_KEEP_ALIVE | CONN_CLOSE)) == CONN_KEEP_ALIVE)
        flags |= FPY3_H1_KEEP_ALIVE;
    if (expect && minor == 1)
        flags |= FPY3_H1_EXPECT_CONTINUE;
    /* RFC 9110 7.8: Upgrade in an HTTP/1.0 request is ignored. */
    if ((conn & CONN_UPGRADE) && upgrade >= 0 && minor == 1)
        flags |= FPY3_H1_UPGRADE;
    else
        upgrade = -1;

    /* RFC 9110 9.3.6: CONNECT asks for a tunnel, which is no ASGI http request */
    if (connect)
        ERR(405, "CONNECT is not supported");
    if (auth && !nhost) {
        /* HTTP/1.0 absolute-form without Host: the app still learns the authority */
        if (nh + 1 > max_count)
            ERR(431, "too many header fields");
        memcpy(w, "host", 5);
        w += 5;
        memcpy(w, auth, alen);
        w += alen;
        *w++ = 0;
        nh++;
    }

    /* decoded path goes last: a %00 in it must not shift the other fields */
    if (rplen == 0)
        *w++ = '/';
    else
        w = pct_decode(w, rp, rplen);

    out->end = p - base;
    out->http_minor = minor;
    out->nheaders = (int64_t)nh;
    out->content_length = cl;
    out->flags = flags;
    out->upgrade = upgrade;
    return w - out->fields;

more:
    if (lim < end) {
        if (in_request_line)
            ERR(414, "request line too long");
        ERR(431, "request header section too large");
    }
    return 0;
}

/* ---- chunked transfer coding (RFC 9112 7.1) ---- */

enum {
    CS_SIZE0 = 0, /* first digit of chunk-size */
    CS_SIZE,
    CS_SIZE_WS, /* BWS before ';' */
    CS_EXT,
    CS_SIZE_LF,
    CS_DATA,
    CS_DATA_CR,
    CS_DATA_LF,
    CS_TR_START, /* start of a trailer line or the final CRLF */
    CS_TR_NAME,
    CS_TR_VALUE,
    CS_TR_LF,
    CS_FINAL_LF,
    CS_DONE,
    CS_ERROR,
};

#define MAX_SIZE_DIGITS 15
#define MAX_EXT_BYTES 4096
#define MAX_TRAILER_BYTES 8192

#define FAIL(why)                                                                                  \
    do {                                                                                           \
        st->reason = (why);                                                                        \
        st->state = CS_ERROR;                                                                      \
        return -400;                                                                               \
    } while (0)

int64_t fpy3_h1_chunked_feed(fpy3_h1_chunked *st, const char *buf, size_t len, size_t start,
                             int64_t *spans, int32_t max_spans)
{
    const uint8_t *b = (const uint8_t *)buf, *p, *e = b + len;
    int32_t n = 0;

    st->nspans = 0;
    if (st->state == CS_ERROR)
        return -400;
    if (start > len)
        FAIL("start beyond buffer");
    p = b + start;

    while (p < e) {
        uint8_t c = *p;
        switch (st->state) {
        case CS_SIZE0:
            if (!(cls[c] & C_HEX))
                FAIL("invalid chunk size");
            st->remaining = hexval(c);
            st->count = 1;
            st->state = CS_SIZE;
            p++;
            break;
        case CS_SIZE:
            if (cls[c] & C_HEX) {
                if (++st->count > MAX_SIZE_DIGITS)
                    FAIL("chunk size too long");
                st->remaining = st->remaining << 4 | hexval(c);
                p++;
                break;
            }
            st->count = 1; /* the extension bound counts from this byte */
            if (c == '\r')
                st->state = CS_SIZE_LF;
            else if (c == ';')
                st->state = CS_EXT;
            else if (ows(c))
                st->state = CS_SIZE_WS;
            else
                FAIL("invalid chunk size");
            p++;
            break;
        case CS_SIZE_WS:
            if (++st->count > MAX_EXT_BYTES)
                FAIL("chunk extension too long");
            if (c == ';')
                st->state = CS_EXT;
            else if (!ows(c))
                FAIL("invalid chunk size line");
            p++;
            break;
        case CS_EXT: {
            /* extensions are skipped: only their bytes are checked */
            const uint8_t *s = p;
            size_t room = MAX_EXT_BYTES - st->count;
            const uint8_t *l = (size_t)(e - p) > room ? p + room : e;
            while (p < l && (cls[*p] & C_VAL))
                p++;
            st->count += p - s;
            if (p == e)
                break;
            if (*p != '\r')
                FAIL(p == l ? "chunk extension too long" : "invalid chunk extension");
            st->state = CS_SIZE_LF;
            p++;
            break;
        }
        case CS_SIZE_LF:
            if (c != '\n')
                FAIL("bare CR in chunk size line");
            st->count = 0;
            st->state = st->remaining ? CS_DATA : CS_TR_START;
            p++;
            break;
        case CS_DATA: {
            if (n == max_spans)
                goto out;
            uint64_t take = (uint64_t)(e - p) < st->remaining ? (uint64_t)(e - p) : st->remaining;
            spans[2 * n] = p - b;
            spans[2 * n + 1] = p - b + (int64_t)take;
            n++;
            p += take;
            st->remaining -= take;
            if (!st->remaining)
                st->state = CS_DATA_CR;
            break;
        }
        case CS_DATA_CR:
            if (c != '\r')
                FAIL("missing CRLF after chunk data");
            st->state = CS_DATA_LF;
            p++;
            break;
        case CS_DATA_LF:
            if (c != '\n')
                FAIL("missing CRLF after chunk data");
            st->state = CS_SIZE0;
            p++;
            break;
        case CS_TR_START:
        case CS_TR_NAME:
        case CS_TR_VALUE:
        case CS_TR_LF:
        case CS_FINAL_LF:
            if (++st->count > MAX_TRAILER_BYTES)
                FAIL("trailer section too large");
            switch (st->state) {
            case CS_TR_START:
                if (c == '\r')
                    st->state = CS_FINAL_LF;
                else if (cls[c] & C_TOK)
                    st->state = CS_TR_NAME;
                else
                    FAIL("invalid trailer field");
                break;
            case CS_TR_NAME:
                if (c == ':')
                    st->state = CS_TR_VALUE;
                else if (!(cls[c] & C_TOK))
                    FAIL("invalid trailer field name");
                break;
            case CS_TR_VALUE:
                if (c == '\r')
                    st->state = CS_TR_LF;
                else if (!(cls[c] & C_VAL))
                    FAIL("invalid trailer field value");
                break;
            case CS_TR_LF:
                if (c != '\n')
                    FAIL("bare CR in trailer section");
                st->state = CS_TR_START;
                break;
            case CS_FINAL_LF:
                if (c != '\n')
                    FAIL("bare CR at end of chunked body");
                st->state = CS_DONE;
                st->done = 1;
                p++;
                goto out;
            }
            p++;
            break;
        case CS_DONE:
            goto out;
        default:
            FAIL("invalid decoder state");
        }
    }
out:
    st->nspans = n;
    return p - b;
}
