/* engine_common: see engine_common.h. */
#include "engine_common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SLOTS (1u << 24) /* the slot index is the handle's low 24 bits */

void fpy3_engine_base_init(fpy3_engine_base *b, const fpy3_engine_ops *ops,
                           const fpy3_engine_app *cb, void *app)
{
    memset(b, 0, sizeof(*b));
    b->ops = ops;
    b->cb = *cb;
    b->app = app;
}

void fpy3_engine_base_free(fpy3_engine_base *b)
{
    free(b->slots);
    free(b->freeslots);
    b->slots = NULL;
    b->freeslots = NULL;
    b->nslots = b->slotcap = b->nfree = 0;
}

int fpy3_conn_table_add(fpy3_engine_base *b, fpy3_qconn *qc)
{
    uint32_t s;
    if (b->nfree) {
        s = b->freeslots[--b->nfree];
    } else {
        if (b->nslots == b->slotcap) {
            uint32_t ncap = b->slotcap ? b->slotcap * 2 : 64;
            if (ncap > MAX_SLOTS)
                return -1;
            /* Both arrays are the table's, freed in fpy3_engine_base_free; each
             * keeps working at the old size when the other cannot grow. */
            fpy3_qconn **ns = realloc(b->slots, ncap * sizeof(*ns));
            if (!ns)
                return -1;
            b->slots = ns;
            uint32_t *nf = realloc(b->freeslots, ncap * sizeof(*nf));
            if (!nf)
                return -1;
            b->freeslots = nf;
            b->slotcap = ncap;
        }
        s = b->nslots++;
    }
    fpy3_qconn_base *q = FPY3_QB(qc);
    b->slots[s] = qc;
    q->slot = s;
    q->handle = (++b->counter << 24) | s;
    return 0;
}

void fpy3_conn_table_remove(fpy3_engine_base *b, fpy3_qconn *qc)
{
    fpy3_qconn_base *q = FPY3_QB(qc);
    if (!q->handle || q->slot >= b->nslots || b->slots[q->slot] != qc)
        return;
    b->slots[q->slot] = NULL;
    b->freeslots[b->nfree++] = q->slot; /* room: freeslots is as large as slots */
    q->handle = 0;
}

uint64_t fpy3_common_conn_handle(fpy3_qconn *qc) { return FPY3_QB(qc)->handle; }

void *fpy3_common_conn_find(fpy3_engine *e, uint64_t handle)
{
    fpy3_qconn *qc = fpy3_conn_table_find(FPY3_EB(e), handle);
    return qc ? FPY3_QB(qc)->ac : NULL;
}

void fpy3_common_each(fpy3_engine *e, void (*fn)(void *ac, void *arg), void *arg)
{
    fpy3_engine_base *b = FPY3_EB(e);
    for (uint32_t i = 0; i < b->nslots; i++) {
        fpy3_qconn *qc = b->slots[i];
        if (qc && FPY3_QB(qc)->ac)
            fn(FPY3_QB(qc)->ac, arg);
    }
}

void fpy3_common_defer(fpy3_qconn *qc) { FPY3_QB(qc)->defer = 1; }

void fpy3_dirty_run(fpy3_engine_base *b, int honor_defer, int (*write)(fpy3_qconn *qc))
{
    /* The pass works on its own list, so connections marked meanwhile (a write
     * marking its own connection again) wait for the next pass instead of looping. */
    b->running = b->dirty;
    b->dirty = NULL;
    for (fpy3_qconn *qc = b->running; qc; qc = FPY3_QB(qc)->dnext)
        FPY3_QB(qc)->dirty = FPY3_ON_RUNNING;
    while (b->running) {
        fpy3_qconn *qc = b->running;
        fpy3_qconn_base *q = FPY3_QB(qc);
        fpy3_dirty_del(qc);
        if (honor_defer && q->defer) {
            q->defer = 0;
            fpy3_dirty_add(qc);
            continue;
        }
        q->defer = 0;
        if (write(qc) < 0)
            break;
    }
    /* Stopped early: what the pass did not reach stays marked. */
    while (b->running) {
        fpy3_qconn *qc = b->running;
        fpy3_dirty_del(qc);
        fpy3_dirty_add(qc);
    }
}

void fpy3_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}
