/* sd_hash.h - XXH64, the page checksum of shmdedup.  Plain C, no Python:
 * testable on its own (native/tests/test_sd.c). */
#ifndef SD_HASH_H
#define SD_HASH_H
#include <stddef.h>
#include <stdint.h>

/* XXH64 (Yann Collet's algorithm, BSD), equal to xxhash.xxh64_intdigest(data,
 * seed).  Four independent lanes: about four times MurmurHash3's speed here. */
uint64_t sd_xxh64(const void *data, size_t len, uint64_t seed);

/* out[i] = sd_xxh64(page i of buf, page_size, seed) for i < n: eight pages at
 * a time with AVX-512 (x86-64 CPUs with avx512f and avx512dq, unless the
 * environment sets SHMDEDUP_NO_SIMD), one at a time otherwise. */
void sd_xxh64_pages(const uint8_t *buf, size_t n, size_t page_size, uint64_t seed, uint64_t *out);

/* 1 if sd_xxh64_pages uses AVX-512 in this process. */
int sd_hash_simd(void);

/* The page checksum the scanner uses: XXH64 with seed 0 (as Linux KSM's
 * calc_checksum uses xxhash).  Only a hint: merges are proven by memcmp. */
static inline uint64_t sd_page_checksum(const void *page, size_t page_size)
{
    return sd_xxh64(page, page_size, 0);
}
#endif
