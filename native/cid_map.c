/* cid_map: see cid_map.h. */
#include "cid_map.h"

#include <stdlib.h>
#include <string.h>

static uint64_t cid_hash(const fpy3_cid_map *m, const uint8_t *p, size_t len)
{
    uint64_t h = m->seed ^ (len * 0x9e3779b97f4a7c15ull);
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        p += 8;
        len -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, len);
    h = (h ^ w) * 0x94d049bb133111ebull;
    return h ^ (h >> 29);
}

static int cid_eq(const ngtcp2_cid *a, const uint8_t *p, size_t len)
{
    return a->datalen == len && memcmp(a->data, p, len) == 0;
}

int fpy3_cid_map_init(fpy3_cid_map *m, size_t cap, uint64_t seed)
{
    m->slots = calloc(cap, sizeof(*m->slots));
    m->cap = cap;
    m->n = 0;
    m->seed = seed;
    return m->slots ? 0 : -1;
}

void fpy3_cid_map_free(fpy3_cid_map *m)
{
    free(m->slots);
    m->slots = NULL;
    m->cap = m->n = 0;
}

fpy3_qconn *fpy3_cid_find(const fpy3_cid_map *m, const uint8_t *p, size_t len)
{
    size_t mask = m->cap - 1, i = cid_hash(m, p, len) & mask;
    for (;; i = (i + 1) & mask) {
        const fpy3_cid_slot *s = &m->slots[i];
        if (!s->qc)
            return NULL;
        if (cid_eq(&s->cid, p, len))
            return s->qc;
    }
}

static int grow(fpy3_cid_map *m)
{
    size_t ncap = m->cap * 2;
    fpy3_cid_slot *old = m->slots, *ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return -1;
    size_t ocap = m->cap;
    m->slots = ns;
    m->cap = ncap;
    for (size_t i = 0; i < ocap; i++) {
        if (!old[i].qc)
            continue;
        size_t j = cid_hash(m, old[i].cid.data, old[i].cid.datalen) & (ncap - 1);
        while (ns[j].qc)
            j = (j + 1) & (ncap - 1);
        ns[j] = old[i];
    }
    free(old);
    return 0;
}

int fpy3_cid_put(fpy3_cid_map *m, const ngtcp2_cid *cid, fpy3_qconn *qc)
{
    if ((m->n + 1) * 4 > m->cap * 3 && grow(m) < 0)
        return -1;
    size_t mask = m->cap - 1, i = cid_hash(m, cid->data, cid->datalen) & mask;
    for (;; i = (i + 1) & mask) {
        fpy3_cid_slot *s = &m->slots[i];
        if (!s->qc) {
            s->cid = *cid;
            s->qc = qc;
            m->n++;
            return 0;
        }
        if (cid_eq(&s->cid, cid->data, cid->datalen)) {
            s->qc = qc;
            return 0;
        }
    }
}

void fpy3_cid_del(fpy3_cid_map *m, const ngtcp2_cid *cid, const fpy3_qconn *qc)
{
    size_t mask = m->cap - 1, i = cid_hash(m, cid->data, cid->datalen) & mask;
    for (;; i = (i + 1) & mask) {
        if (!m->slots[i].qc)
            return;
        if (cid_eq(&m->slots[i].cid, cid->data, cid->datalen))
            break;
    }
    if (m->slots[i].qc != qc)
        return; /* the id now names another connection */
    m->slots[i].qc = NULL;
    m->n--;
    /* Backward shift: pull later entries of the probe run into the hole. */
    for (size_t j = (i + 1) & mask; m->slots[j].qc; j = (j + 1) & mask) {
        size_t home = cid_hash(m, m->slots[j].cid.data, m->slots[j].cid.datalen) & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = m->slots[j];
            m->slots[j].qc = NULL;
            i = j;
        }
    }
}

void fpy3_cid_del_all(fpy3_cid_map *m, const fpy3_qconn *qc)
{
    size_t i = 0;
    while (i < m->cap) {
        if (m->slots[i].qc != qc) {
            i++;
            continue;
        }
        ngtcp2_cid cid = m->slots[i].cid;
        fpy3_cid_del(m, &cid, qc); /* may shift another entry into i: look at it again */
    }
}
