/* sd_hash.h - MurmurHash3 x64-128 (Austin Appleby's algorithm, public domain),
 * the page checksum of shmdedup.  Plain C, no Python: testable on its own. */
#ifndef SD_HASH_H
#define SD_HASH_H
#include <stddef.h>
#include <stdint.h>

/* out[0] = h1, out[1] = h2, exactly as mmh3.hash64(data, seed, signed=False). */
void sd_murmur3_x64_128(const void *data, size_t len, uint32_t seed, uint64_t out[2]);

/* The page checksum: h1 of MurmurHash3 x64-128 with seed 0. */
static inline uint64_t sd_page_checksum(const void *page, size_t page_size)
{
    uint64_t h[2];
    sd_murmur3_x64_128(page, page_size, 0, h);
    return h[0];
}
#endif
