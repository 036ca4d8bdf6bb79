/* timer_heap: one timer for many deadlines, a binary min-heap.
 *
 * Each timed object embeds an fpy3_timer; the heap keeps pointers to them and
 * each timer knows its place, so moving or removing one is O(log n). Room is
 * reserved ahead (one place per object that may be timed), so setting a timer
 * never allocates and never fails. Loop thread only; internal to the engines.
 */
#ifndef FPY3_TIMER_HEAP_H
#define FPY3_TIMER_HEAP_H

#include <stdint.h>

#define FPY3_TIMER_NEVER UINT64_MAX
#define FPY3_TIMER_OUT UINT32_MAX /* idx of a timer not in the heap */

typedef struct {
    uint64_t expiry; /* FPY3_TIMER_NEVER: not set */
    uint32_t idx;    /* its place in the heap, or FPY3_TIMER_OUT */
} fpy3_timer;

typedef struct {
    fpy3_timer **heap; /* owned, as is due; both hold cap entries */
    fpy3_timer **due;  /* what fpy3_timer_heap_take_due returned */
    uint32_t n, cap;
} fpy3_timer_heap;

static inline void fpy3_timer_init(fpy3_timer *t)
{
    t->expiry = FPY3_TIMER_NEVER;
    t->idx = FPY3_TIMER_OUT;
}

/* Room for n timers at once: 0, or -1 when it cannot grow. */
int fpy3_timer_heap_reserve(fpy3_timer_heap *h, uint32_t n);
void fpy3_timer_heap_free(fpy3_timer_heap *h);

/* Sets t to fire at expiry (FPY3_TIMER_NEVER: takes it out). Room must be reserved. */
void fpy3_timer_set(fpy3_timer_heap *h, fpy3_timer *t, uint64_t expiry);
void fpy3_timer_remove(fpy3_timer_heap *h, fpy3_timer *t);

/* The earliest expiry, or FPY3_TIMER_NEVER. */
static inline uint64_t fpy3_timer_heap_next(const fpy3_timer_heap *h)
{
    return h->n ? h->heap[0]->expiry : FPY3_TIMER_NEVER;
}

/* Takes every timer due at now out of the heap, so each is handled once per call
 * even when handling sets it again: *n of them, valid until the next call. */
fpy3_timer **fpy3_timer_heap_take_due(fpy3_timer_heap *h, uint64_t now, uint32_t *n);

#endif
