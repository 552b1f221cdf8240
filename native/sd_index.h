/* sd_index.h - an open-addressing hash table from 64-bit checksums to 64-bit
 * values, for the scanner's stable and unstable indexes.  Plain C. */
#ifndef SD_INDEX_H
#define SD_INDEX_H
#include <stddef.h>
#include <stdint.h>

struct sd_index {
    uint64_t *keys;
    int64_t *vals;      /* -1 marks an empty bucket */
    size_t mask;        /* capacity - 1 (capacity is a power of two) */
    size_t count;
};

int sd_index_init(struct sd_index *ix, size_t capacity);
void sd_index_free(struct sd_index *ix);
void sd_index_clear(struct sd_index *ix);
/* The value stored for key, or -1. */
int64_t sd_index_get(const struct sd_index *ix, uint64_t key);
/* Store key -> val (val >= 0), replacing any value.  -1 on ENOMEM. */
int sd_index_put(struct sd_index *ix, uint64_t key, int64_t val);
/* Remove key; returns 1 if it was there. */
int sd_index_del(struct sd_index *ix, uint64_t key);
#endif
