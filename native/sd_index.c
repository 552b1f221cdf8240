/* sd_index.c - linear-probing hash table keyed by page checksums.
 *
 * Why not a Python dict: the indexes hold one entry per tracked page, and the
 * steady state must not keep a Python object per page (an int key, a value
 * tuple: ~100 bytes each) nor pay an interpreter round trip per lookup.  Here an
 * entry is 16 bytes, lookups run in batches with the GIL released, deletion is
 * backward-shift (no tombstones), the table doubles at 75% load and halves
 * (sd_index_fit) once under 1/8 full, and a clear gives the memory back.  Keys are
 * already good hashes (XXH64), so the bucket is the key's low bits after one
 * multiply to spread checksum families. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "sd_index.h"

static inline size_t bucket(const struct sd_index *ix, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 17) & ix->mask;
}

int sd_index_init(struct sd_index *ix, size_t capacity)
{
    size_t cap = 16;
    while (cap < capacity)
        cap <<= 1;
    ix->keys = malloc(cap * sizeof *ix->keys);
    ix->vals = malloc(cap * sizeof *ix->vals);
    if (!ix->keys || !ix->vals) {
        free(ix->keys);
        free(ix->vals);
        ix->keys = NULL;
        ix->vals = NULL;
        errno = ENOMEM;
        return -1;
    }
    memset(ix->vals, 0xff, cap * sizeof *ix->vals);
    ix->mask = cap - 1;
    ix->count = 0;
    return 0;
}

void sd_index_free(struct sd_index *ix)
{
    free(ix->keys);
    free(ix->vals);
    ix->keys = NULL;
    ix->vals = NULL;
    ix->count = 0;
}

void sd_index_clear(struct sd_index *ix)
{
    memset(ix->vals, 0xff, (ix->mask + 1) * sizeof *ix->vals);
    ix->count = 0;
}

int64_t sd_index_get(const struct sd_index *ix, uint64_t key)
{
    for (size_t b = bucket(ix, key);; b = (b + 1) & ix->mask) {
        if (ix->vals[b] < 0)
            return -1;
        if (ix->keys[b] == key)
            return ix->vals[b];
    }
}

/* Rehash into a table of capacity cap (>= count / 0.75). */
static int rehash(struct sd_index *ix, size_t cap)
{
    struct sd_index other;
    if (sd_index_init(&other, cap) < 0)
        return -1;
    for (size_t b = 0; b <= ix->mask; b++)
        if (ix->vals[b] >= 0)
            sd_index_put(&other, ix->keys[b], ix->vals[b]);
    sd_index_free(ix);
    *ix = other;
    return 0;
}

static int grow(struct sd_index *ix)
{
    return rehash(ix, (ix->mask + 1) * 2);
}

int sd_index_fit(struct sd_index *ix, size_t min_capacity)
{
    size_t cap = ix->mask + 1, want = cap;
    while (want > 16 && want > min_capacity && ix->count * 8 < want)
        want >>= 1;
    if (want == cap)
        return 0;
    return rehash(ix, want);
}

int sd_index_reset(struct sd_index *ix, size_t capacity)
{
    struct sd_index small;
    if (sd_index_init(&small, capacity) < 0) {
        sd_index_clear(ix);     /* no memory for a new table: keep the old one, emptied */
        return -1;
    }
    sd_index_free(ix);
    *ix = small;
    return 0;
}

int sd_index_put(struct sd_index *ix, uint64_t key, int64_t val)
{
    if ((ix->count + 1) * 4 > (ix->mask + 1) * 3 && grow(ix) < 0)
        return -1;
    for (size_t b = bucket(ix, key);; b = (b + 1) & ix->mask) {
        if (ix->vals[b] < 0) {
            ix->keys[b] = key;
            ix->vals[b] = val;
            ix->count++;
            return 0;
        }
        if (ix->keys[b] == key) {
            ix->vals[b] = val;
            return 0;
        }
    }
}

int sd_index_del(struct sd_index *ix, uint64_t key)
{
    size_t b = bucket(ix, key);
    for (;; b = (b + 1) & ix->mask) {
        if (ix->vals[b] < 0)
            return 0;
        if (ix->keys[b] == key)
            break;
    }
    /* Backward-shift: move later members of the probe run into the hole. */
    size_t hole = b;
    for (size_t j = (b + 1) & ix->mask; ix->vals[j] >= 0; j = (j + 1) & ix->mask) {
        size_t home = bucket(ix, ix->keys[j]);
        /* j may move to hole if home is not cyclically in (hole, j]. */
        int in_range = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!in_range) {
            ix->keys[hole] = ix->keys[j];
            ix->vals[hole] = ix->vals[j];
            hole = j;
        }
    }
    ix->vals[hole] = -1;
    ix->count--;
    return 1;
}

/* ---- sd_slotix: checksum -> stable slot, the keys kept by the caller ----
 *
 * The stable index's keys are already in the caller's per-slot checksum
 * array (keys[slot]), so a bucket holds only the slot and the key's high 32
 * bits (8 bytes instead of 16): a probe compares those bits first and reads
 * keys[slot] only when they match.  Same probing, load factor, deletion and
 * shrinking as sd_index. */

#define SX_SLOT(e) ((int64_t)(uint32_t)(e) - 1)
#define SX_FRAG(k) ((k) >> 32)
#define SX_ENTRY(k, s) ((SX_FRAG(k) << 32) | (uint64_t)((s) + 1))

static inline size_t sx_bucket(const struct sd_slotix *ix, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 17) & ix->mask;
}

int sd_slotix_init(struct sd_slotix *ix, size_t capacity)
{
    size_t cap = 16;
    while (cap < capacity)
        cap <<= 1;
    ix->b = calloc(cap, sizeof *ix->b);      /* 0 marks an empty bucket */
    if (!ix->b) {
        errno = ENOMEM;
        return -1;
    }
    ix->mask = cap - 1;
    ix->count = 0;
    return 0;
}

void sd_slotix_free(struct sd_slotix *ix)
{
    free(ix->b);
    ix->b = NULL;
    ix->count = 0;
}

int64_t sd_slotix_get(const struct sd_slotix *ix, const uint64_t *keys, uint64_t key)
{
    for (size_t b = sx_bucket(ix, key);; b = (b + 1) & ix->mask) {
        uint64_t e = ix->b[b];
        if (!e)
            return -1;
        if ((e >> 32) == SX_FRAG(key) && keys[SX_SLOT(e)] == key)
            return SX_SLOT(e);
    }
}

static void sx_insert(struct sd_slotix *ix, const uint64_t *keys, uint64_t key, int64_t slot)
{
    for (size_t b = sx_bucket(ix, key);; b = (b + 1) & ix->mask) {
        uint64_t e = ix->b[b];
        if (!e) {
            ix->b[b] = SX_ENTRY(key, slot);
            ix->count++;
            return;
        }
        if ((e >> 32) == SX_FRAG(key) && keys[SX_SLOT(e)] == key) {
            ix->b[b] = SX_ENTRY(key, slot);
            return;
        }
    }
}

static int sx_rehash(struct sd_slotix *ix, const uint64_t *keys, size_t cap)
{
    struct sd_slotix other;
    if (sd_slotix_init(&other, cap) < 0)
        return -1;
    for (size_t b = 0; b <= ix->mask; b++)
        if (ix->b[b]) {
            int64_t s = SX_SLOT(ix->b[b]);
            sx_insert(&other, keys, keys[s], s);
        }
    sd_slotix_free(ix);
    *ix = other;
    return 0;
}

int sd_slotix_put(struct sd_slotix *ix, const uint64_t *keys, uint64_t key, int64_t slot)
{
    if ((ix->count + 1) * 4 > (ix->mask + 1) * 3 && sx_rehash(ix, keys, (ix->mask + 1) * 2) < 0)
        return -1;
    sx_insert(ix, keys, key, slot);
    return 0;
}

int sd_slotix_del(struct sd_slotix *ix, const uint64_t *keys, uint64_t key)
{
    size_t b = sx_bucket(ix, key);
    for (;; b = (b + 1) & ix->mask) {
        uint64_t e = ix->b[b];
        if (!e)
            return 0;
        if ((e >> 32) == SX_FRAG(key) && keys[SX_SLOT(e)] == key)
            break;
    }
    size_t hole = b;
    for (size_t j = (b + 1) & ix->mask; ix->b[j]; j = (j + 1) & ix->mask) {
        size_t home = sx_bucket(ix, keys[SX_SLOT(ix->b[j])]);
        int in_range = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!in_range) {
            ix->b[hole] = ix->b[j];
            hole = j;
        }
    }
    ix->b[hole] = 0;
    ix->count--;
    return 1;
}

int sd_slotix_fit(struct sd_slotix *ix, const uint64_t *keys, size_t min_capacity)
{
    size_t cap = ix->mask + 1, want = cap;
    while (want > 16 && want > min_capacity && ix->count * 8 < want)
        want >>= 1;
    if (want == cap)
        return 0;
    return sx_rehash(ix, keys, want);
}

int sd_slotix_reset(struct sd_slotix *ix, size_t capacity)
{
    struct sd_slotix small;
    if (sd_slotix_init(&small, capacity) < 0) {
        memset(ix->b, 0, (ix->mask + 1) * sizeof *ix->b);
        ix->count = 0;
        return -1;
    }
    sd_slotix_free(ix);
    *ix = small;
    return 0;
}
