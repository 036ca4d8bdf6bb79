/* engine: the engine.h entry points, dispatched to the engine a server was made with. */
#include "engine.h"

#include <stdio.h>
#include <string.h>

#define OPS(e) (*(const fpy3_engine_ops *const *)(e))
#define QOPS(qc) OPS(*(fpy3_engine *const *)(qc))

fpy3_engine *fpy3_engine_new(int fd, const fpy3_engine_config *cfg, const fpy3_engine_app *cb,
                             void *app, char *err, size_t errlen)
{
    const fpy3_engine_ops *ops =
        cfg->engine == FPY3_ENGINE_MSQUIC ? &fpy3_engine_msquic : &fpy3_engine_ngtcp2;
    return ops->new(fd, cfg, cb, app, err, errlen);
}

void fpy3_engine_free(fpy3_engine *e)
{
    if (e)
        OPS(e)->free(e);
}

int fpy3_engine_fd(fpy3_engine *e) { return OPS(e)->fd(e); }
int fpy3_engine_read(fpy3_engine *e) { return OPS(e)->read(e); }
int fpy3_engine_expire(fpy3_engine *e) { return OPS(e)->expire(e); }
int fpy3_engine_flush(fpy3_engine *e) { return OPS(e)->flush(e); }
int64_t fpy3_engine_next_timeout_ms(fpy3_engine *e) { return OPS(e)->next_timeout_ms(e); }
int fpy3_engine_want_write(fpy3_engine *e) { return OPS(e)->want_write(e); }
void fpy3_engine_stop_accepting(fpy3_engine *e) { OPS(e)->stop_accepting(e); }
size_t fpy3_engine_conn_count(fpy3_engine *e) { return OPS(e)->conn_count(e); }
void fpy3_engine_close_all(fpy3_engine *e, uint64_t app_error) { OPS(e)->close_all(e, app_error); }

void fpy3_engine_each(fpy3_engine *e, void (*fn)(void *ac, void *arg), void *arg)
{
    OPS(e)->each(e, fn, arg);
}

uint64_t fpy3_engine_conn_handle(fpy3_qconn *qc) { return QOPS(qc)->conn_handle(qc); }
void *fpy3_engine_conn_find(fpy3_engine *e, uint64_t h) { return OPS(e)->conn_find(e, h); }

const struct sockaddr *fpy3_engine_conn_peer(fpy3_qconn *qc, uint32_t *len)
{
    return QOPS(qc)->conn_peer(qc, len);
}

const struct sockaddr *fpy3_engine_conn_local(fpy3_qconn *qc, uint32_t *len)
{
    return QOPS(qc)->conn_local(qc, len);
}

void fpy3_engine_mark(fpy3_qconn *qc) { QOPS(qc)->mark(qc); }
void fpy3_engine_defer(fpy3_qconn *qc) { QOPS(qc)->defer(qc); }
int fpy3_engine_open_uni(fpy3_qconn *qc, int64_t *sid) { return QOPS(qc)->open_uni(qc, sid); }

void fpy3_engine_extend(fpy3_qconn *qc, int64_t sid, uint64_t n)
{
    QOPS(qc)->extend(qc, sid, n);
}

void fpy3_engine_grow(fpy3_qconn *qc, int64_t sid, uint64_t n)
{
    if (QOPS(qc)->grow)
        QOPS(qc)->grow(qc, sid, n);
}

uint64_t fpy3_engine_rtt_ns(fpy3_qconn *qc) { return QOPS(qc)->rtt_ns ? QOPS(qc)->rtt_ns(qc) : 0; }

void fpy3_engine_stats_get(fpy3_engine *e, fpy3_engine_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (OPS(e)->stats)
        OPS(e)->stats(e, out);
    else
        out->connections = OPS(e)->conn_count(e);
}

void fpy3_engine_extend_streams_bidi(fpy3_qconn *qc, uint64_t n)
{
    QOPS(qc)->extend_streams_bidi(qc, n);
}

uint64_t fpy3_engine_max_streams_bidi(fpy3_qconn *qc) { return QOPS(qc)->max_streams_bidi(qc); }

int fpy3_engine_shutdown_stream(fpy3_qconn *qc, int64_t sid, uint64_t app_error, int how)
{
    return QOPS(qc)->shutdown_stream(qc, sid, app_error, how);
}

void fpy3_engine_conn_error(fpy3_qconn *qc, uint64_t e) { QOPS(qc)->conn_error(qc, e); }
void fpy3_engine_conn_close(fpy3_qconn *qc, uint64_t e) { QOPS(qc)->conn_close(qc, e); }

void fpy3_engine_conn_stats(fpy3_qconn *qc, fpy3_conn_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (QOPS(qc)->conn_stats)
        QOPS(qc)->conn_stats(qc, out);
}

int fpy3_engine_conn_early(fpy3_qconn *qc)
{
    return QOPS(qc)->conn_early ? QOPS(qc)->conn_early(qc) : 0;
}

int fpy3_engine_conn_tls(fpy3_qconn *qc, fpy3_tls_info *out)
{
    return QOPS(qc)->conn_tls ? QOPS(qc)->conn_tls(qc, out) : -1;
}

int fpy3_engine_reload_credentials(fpy3_engine *e, const char *cert_file, const char *key_file,
                                   const char *key_password, char *err, size_t errlen)
{
    if (!OPS(e)->reload_credentials) {
        snprintf(err, errlen, "this QUIC engine cannot reload its certificate");
        return -1;
    }
    return OPS(e)->reload_credentials(e, cert_file, key_file, key_password, err, errlen);
}
