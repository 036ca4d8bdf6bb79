/* engine_common: what every QUIC engine (engine.h) shares.
 *
 * - The first members of each engine's struct fpy3_engine (fpy3_engine_base) and
 *   struct fpy3_qconn (fpy3_qconn_base): engine.c dispatches on their first
 *   pointers, and the code here works on the rest.
 * - The connection table behind the 64-bit handles: slot index in the low 24 bits,
 *   a per-engine counter above, so a handle kept past its connection's end finds
 *   nothing (a reused slot carries another counter value).
 * - The dirty list: connections with something to send, written by the next flush.
 * - Error text for the err/errlen out-parameters.
 *
 * Loop thread only. Internal: not part of the Python-facing API.
 */
#ifndef FPY3_ENGINE_COMMON_H
#define FPY3_ENGINE_COMMON_H

#include "engine.h"

#include <stddef.h>
#include <stdint.h>

/* The first member of each engine's struct fpy3_qconn. */
typedef struct {
    fpy3_engine *e;  /* first: engine.c dispatches on it */
    void *ac;        /* the app's state: set by conn_open, NULL before and after */
    uint64_t handle; /* 0 until the connection is in the table */
    uint32_t slot;
    uint8_t dirty;   /* 0, FPY3_ON_DIRTY or FPY3_ON_RUNNING: which list holds it */
    uint8_t defer;   /* the app flushes soon: a read leaves its packets to that flush */
    fpy3_qconn *dnext, *dprev;
} fpy3_qconn_base;

/* The first member of each engine's struct fpy3_engine. */
typedef struct {
    const fpy3_engine_ops *ops; /* first: engine.c dispatches on it */
    fpy3_engine_app cb;
    void *app;
    fpy3_qconn **slots; /* NULL entries are free */
    uint32_t nslots, slotcap;
    uint32_t *freeslots;
    uint32_t nfree;
    uint64_t counter;
    fpy3_qconn *dirty;   /* to write at the next flush */
    fpy3_qconn *running; /* the pass fpy3_dirty_run is making */
} fpy3_engine_base;

#define FPY3_QB(qc) ((fpy3_qconn_base *)(qc))
#define FPY3_EB(e) ((fpy3_engine_base *)(e))
#define FPY3_ON_DIRTY 1
#define FPY3_ON_RUNNING 2

void fpy3_engine_base_init(fpy3_engine_base *b, const fpy3_engine_ops *ops,
                           const fpy3_engine_app *cb, void *app);
void fpy3_engine_base_free(fpy3_engine_base *b); /* the table only: connections are the engine's */

/* Gives qc a slot and a handle: 0, or -1 when the table cannot grow. */
int fpy3_conn_table_add(fpy3_engine_base *b, fpy3_qconn *qc);
/* Frees qc's slot (a no-op for a connection never added): its handle finds nothing. */
void fpy3_conn_table_remove(fpy3_engine_base *b, fpy3_qconn *qc);

static inline fpy3_qconn *fpy3_conn_table_find(const fpy3_engine_base *b, uint64_t handle)
{
    uint32_t s = (uint32_t)(handle & 0xffffff);
    if (s >= b->nslots || !b->slots[s] || FPY3_QB(b->slots[s])->handle != handle)
        return NULL;
    return b->slots[s];
}

/* Ops every engine implements alike. */
uint64_t fpy3_common_conn_handle(fpy3_qconn *qc);
void *fpy3_common_conn_find(fpy3_engine *e, uint64_t handle);
void fpy3_common_each(fpy3_engine *e, void (*fn)(void *ac, void *arg), void *arg);
void fpy3_common_defer(fpy3_qconn *qc);

/* --- dirty list --- */

static inline void fpy3_dirty_add(fpy3_qconn *qc)
{
    fpy3_qconn_base *q = FPY3_QB(qc);
    if (q->dirty)
        return; /* on a list already (on the running pass: written by it) */
    fpy3_engine_base *b = FPY3_EB(q->e);
    q->dirty = FPY3_ON_DIRTY;
    q->dprev = NULL;
    q->dnext = b->dirty;
    if (b->dirty)
        FPY3_QB(b->dirty)->dprev = qc;
    b->dirty = qc;
}

static inline void fpy3_dirty_del(fpy3_qconn *qc)
{
    fpy3_qconn_base *q = FPY3_QB(qc);
    if (!q->dirty)
        return;
    fpy3_engine_base *b = FPY3_EB(q->e);
    if (q->dprev)
        FPY3_QB(q->dprev)->dnext = q->dnext;
    else if (q->dirty == FPY3_ON_RUNNING)
        b->running = q->dnext;
    else
        b->dirty = q->dnext;
    if (q->dnext)
        FPY3_QB(q->dnext)->dprev = q->dprev;
    q->dirty = 0;
    q->dnext = q->dprev = NULL;
}

/* Calls write(qc) once for each connection on the dirty list. Connections marked
 * during the pass (write marking its own connection again included) wait for the
 * next one; with honor_defer, deferred connections stay marked for the app's flush.
 * write returning < 0 (the socket is full) ends the pass: the rest stay marked. */
void fpy3_dirty_run(fpy3_engine_base *b, int honor_defer, int (*write)(fpy3_qconn *qc));

/* --- errors --- */

/* Formats into err (errlen bytes, NUL-terminated); a no-op when err is NULL. */
void fpy3_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
