/* timer_heap: see timer_heap.h. */
#include "timer_heap.h"

#include <stdlib.h>

int fpy3_timer_heap_reserve(fpy3_timer_heap *h, uint32_t n)
{
    if (n <= h->cap)
        return 0;
    uint32_t ncap = h->cap ? h->cap : 64;
    while (ncap < n) {
        if (ncap > UINT32_MAX / 2)
            return -1;
        ncap *= 2;
    }
    /* Each array is kept at its old size when the other cannot grow. */
    fpy3_timer **nh = realloc(h->heap, ncap * sizeof(*nh));
    if (!nh)
        return -1;
    h->heap = nh;
    fpy3_timer **nd = realloc(h->due, ncap * sizeof(*nd));
    if (!nd)
        return -1;
    h->due = nd;
    h->cap = ncap;
    return 0;
}

void fpy3_timer_heap_free(fpy3_timer_heap *h)
{
    free(h->heap);
    free(h->due);
    h->heap = h->due = NULL;
    h->n = h->cap = 0;
}

static void swap(fpy3_timer_heap *h, uint32_t a, uint32_t b)
{
    fpy3_timer *t = h->heap[a];
    h->heap[a] = h->heap[b];
    h->heap[b] = t;
    h->heap[a]->idx = a;
    h->heap[b]->idx = b;
}

static void up(fpy3_timer_heap *h, uint32_t i)
{
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (h->heap[p]->expiry <= h->heap[i]->expiry)
            break;
        swap(h, i, p);
        i = p;
    }
}

static void down(fpy3_timer_heap *h, uint32_t i)
{
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && h->heap[l]->expiry < h->heap[m]->expiry)
            m = l;
        if (r < h->n && h->heap[r]->expiry < h->heap[m]->expiry)
            m = r;
        if (m == i)
            return;
        swap(h, i, m);
        i = m;
    }
}

void fpy3_timer_remove(fpy3_timer_heap *h, fpy3_timer *t)
{
    uint32_t i = t->idx;
    if (i == FPY3_TIMER_OUT)
        return;
    t->idx = FPY3_TIMER_OUT;
    h->n--;
    if (i == h->n)
        return;
    h->heap[i] = h->heap[h->n];
    h->heap[i]->idx = i;
    up(h, i);
    down(h, h->heap[i]->idx);
}

void fpy3_timer_set(fpy3_timer_heap *h, fpy3_timer *t, uint64_t expiry)
{
    t->expiry = expiry;
    if (expiry == FPY3_TIMER_NEVER) {
        fpy3_timer_remove(h, t);
        return;
    }
    if (t->idx == FPY3_TIMER_OUT) {
        if (h->n == h->cap)
            return; /* never: every timed object reserved its place */
        t->idx = h->n;
        h->heap[h->n++] = t;
        up(h, t->idx);
    } else {
        up(h, t->idx);
        down(h, t->idx);
    }
}

fpy3_timer **fpy3_timer_heap_take_due(fpy3_timer_heap *h, uint64_t now, uint32_t *n)
{
    uint32_t k = 0;
    while (h->n && h->heap[0]->expiry <= now) {
        fpy3_timer *t = h->heap[0];
        fpy3_timer_remove(h, t);
        h->due[k++] = t;
    }
    *n = k;
    return h->due;
}
