/* sd_index.c - linear-probing hash table keyed by page checksums.
 *
 * Why not a Python dict: the indexes hold one entry per tracked page, and the
 * steady state must not keep a Python object per page (an int key, a value
 * tuple: ~100 bytes each) nor pay an interpreter round trip per lookup.  Here an
 * entry is 16 bytes, lookups run in batches with the GIL released, deletion is
 * backward-shift (no tombstones), and the table doubles at 75% load.  Keys are
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

static int grow(struct sd_index *ix)
{
    struct sd_index bigger;
    if (sd_index_init(&bigger, (ix->mask + 1) * 2) < 0)
        return -1;
    for (size_t b = 0; b <= ix->mask; b++)
        if (ix->vals[b] >= 0)
            sd_index_put(&bigger, ix->keys[b], ix->vals[b]);
    sd_index_free(ix);
    *ix = bigger;
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
