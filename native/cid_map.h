/* cid_map: connection id -> connection, for routing datagrams to connections.
 *
 * Open addressing with linear probing and backward-shift deletion, kept at most
 * 3/4 full. The hash is keyed per map: connection ids are client-chosen (the
 * first DCID) or random, and a client must not be able to pick our buckets.
 * Loop thread only; internal to the engines.
 */
#ifndef FPY3_CID_MAP_H
#define FPY3_CID_MAP_H

#include "engine.h"

#include <ngtcp2/ngtcp2.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    ngtcp2_cid cid;
    fpy3_qconn *qc; /* NULL = empty */
} fpy3_cid_slot;

typedef struct {
    fpy3_cid_slot *slots; /* owned by the map */
    size_t cap;           /* a power of two */
    size_t n;
    uint64_t seed;
} fpy3_cid_map;

/* cap: the initial size, a power of two. 0, or -1 out of memory. */
int fpy3_cid_map_init(fpy3_cid_map *m, size_t cap, uint64_t seed);
void fpy3_cid_map_free(fpy3_cid_map *m);

fpy3_qconn *fpy3_cid_find(const fpy3_cid_map *m, const uint8_t *cid, size_t len);
/* Adds or re-points cid: 0, or -1 when the map cannot grow. */
int fpy3_cid_put(fpy3_cid_map *m, const ngtcp2_cid *cid, fpy3_qconn *qc);
/* Removes cid if it still names qc. */
void fpy3_cid_del(fpy3_cid_map *m, const ngtcp2_cid *cid, const fpy3_qconn *qc);
/* Removes every id naming qc: a sweep of the whole map, for when qc's ids cannot be
 * listed. */
void fpy3_cid_del_all(fpy3_cid_map *m, const fpy3_qconn *qc);

#endif
