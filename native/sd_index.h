/* sd_index.h - open-addressing hash tables from 64-bit checksums: sd_index to
 * 64-bit values (the unstable index), sd_slotix to stable slots whose
 * checksums the caller keeps (the stable index).  Plain C. */
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
/* Empty the table and give its memory back: a fresh table of capacity
 * buckets (-1 on ENOMEM, the old table kept, emptied). */
int sd_index_reset(struct sd_index *ix, size_t capacity);
/* Halve the table while it is under 1/8 full and above min_capacity buckets
 * (0, or -1 on ENOMEM with the table unchanged). */
int sd_index_fit(struct sd_index *ix, size_t min_capacity);
/* The value stored for key, or -1. */
int64_t sd_index_get(const struct sd_index *ix, uint64_t key);
/* Store key -> val (val >= 0), replacing any value.  -1 on ENOMEM. */
int sd_index_put(struct sd_index *ix, uint64_t key, int64_t val);
/* Remove key; returns 1 if it was there. */
int sd_index_del(struct sd_index *ix, uint64_t key);

/* Checksum -> stable slot (0 <= slot < 2**32 - 1), 8 bytes a bucket: the keys
 * are the caller's per-slot array, keys[slot] being the slot's checksum.
 * Every call that takes keys must pass an array covering every slot stored. */
struct sd_slotix {
    uint64_t *b;        /* (key >> 32) << 32 | (slot + 1); 0 marks an empty bucket */
    size_t mask;
    size_t count;
};

int sd_slotix_init(struct sd_slotix *ix, size_t capacity);
void sd_slotix_free(struct sd_slotix *ix);
int sd_slotix_reset(struct sd_slotix *ix, size_t capacity);
int sd_slotix_fit(struct sd_slotix *ix, const uint64_t *keys, size_t min_capacity);
/* The slot stored for key, or -1. */
int64_t sd_slotix_get(const struct sd_slotix *ix, const uint64_t *keys, uint64_t key);
/* Store key -> slot (keys[slot] == key), replacing any slot.  -1 on ENOMEM. */
int sd_slotix_put(struct sd_slotix *ix, const uint64_t *keys, uint64_t key, int64_t slot);
/* Remove key; returns 1 if it was there. */
int sd_slotix_del(struct sd_slotix *ix, const uint64_t *keys, uint64_t key);
#endif
