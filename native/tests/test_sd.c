/* test_sd.c - a C test driver for the plain-C primitives (sd_*.c), without
 * Python: the hash table, XXH64, page reads and hole punching, and a merge
 * followed by break_cow on real shared-memory objects (memfd).  It also holds
 * MurmurHash3 x64-128 (Austin Appleby's algorithm, public domain), which the
 * product does not use any more (the page checksum is XXH64): kept here as the
 * reference that mmh3, the test oracle, is checked against.
 *
 *   test_sd selftest          run every check; exit 0, or print the failure
 *   test_sd murmur3 HEX SEED  print "h1 h2" (decimal) of the bytes in HEX
 *
 * tests/unit/test_c_core.py builds it with the system compiler and runs it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "sd_break.h"
#include "sd_hash.h"
#include "sd_index.h"
#include "sd_merge.h"
#include "sd_pages.h"
#include "sd_region.h"
#include "sd_view.h"

#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "%s:%d: check failed: %s (errno %d)\n", __FILE__, __LINE__, #cond, errno); \
    exit(1); } } while (0)

/* ---- MurmurHash3 x64-128: the reference for mmh3.hash64(signed=False) ---- */

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static void murmur3_x64_128(const void *key, size_t len, uint32_t seed, uint64_t out[2])
{
    const uint8_t *data = key;
    const size_t nblocks = len / 16;
    uint64_t h1 = seed, h2 = seed;
    const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;

    for (size_t i = 0; i < nblocks; i++) {
        uint64_t k1, k2;
        memcpy(&k1, data + i * 16, 8);
        memcpy(&k2, data + i * 16 + 8, 8);
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
        h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
    }

    const uint8_t *tail = data + nblocks * 16;
    uint64_t k1 = 0, k2 = 0;
    switch (len & 15) {
    case 15: k2 ^= (uint64_t)tail[14] << 48; /* fall through */
    case 14: k2 ^= (uint64_t)tail[13] << 40; /* fall through */
    case 13: k2 ^= (uint64_t)tail[12] << 32; /* fall through */
    case 12: k2 ^= (uint64_t)tail[11] << 24; /* fall through */
    case 11: k2 ^= (uint64_t)tail[10] << 16; /* fall through */
    case 10: k2 ^= (uint64_t)tail[9] << 8;   /* fall through */
    case 9:  k2 ^= (uint64_t)tail[8];
             k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
             /* fall through */
    case 8: k1 ^= (uint64_t)tail[7] << 56; /* fall through */
    case 7: k1 ^= (uint64_t)tail[6] << 48; /* fall through */
    case 6: k1 ^= (uint64_t)tail[5] << 40; /* fall through */
    case 5: k1 ^= (uint64_t)tail[4] << 32; /* fall through */
    case 4: k1 ^= (uint64_t)tail[3] << 24; /* fall through */
    case 3: k1 ^= (uint64_t)tail[2] << 16; /* fall through */
    case 2: k1 ^= (uint64_t)tail[1] << 8;  /* fall through */
    case 1: k1 ^= (uint64_t)tail[0];
            k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
    }

    h1 ^= (uint64_t)len; h2 ^= (uint64_t)len;
    h1 += h2; h2 += h1;
    h1 = fmix64(h1); h2 = fmix64(h2);
    h1 += h2; h2 += h1;
    out[0] = h1;
    out[1] = h2;
}

/* ---- the checks ---------------------------------------------------------- */

static void check_index(void)
{
    struct sd_index ix;
    CHECK(sd_index_init(&ix, 4) == 0);
    for (uint64_t k = 0; k < 1000; k++)
        CHECK(sd_index_put(&ix, k * 0x9e3779b97f4a7c15ULL, (int64_t)k) == 0);
    CHECK(ix.count == 1000);
    for (uint64_t k = 0; k < 1000; k++)
        CHECK(sd_index_get(&ix, k * 0x9e3779b97f4a7c15ULL) == (int64_t)k);
    CHECK(sd_index_get(&ix, 12345) == -1);
    for (uint64_t k = 0; k < 1000; k += 2)
        CHECK(sd_index_del(&ix, k * 0x9e3779b97f4a7c15ULL) == 1);
    for (uint64_t k = 0; k < 1000; k++)
        CHECK(sd_index_get(&ix, k * 0x9e3779b97f4a7c15ULL) == (k % 2 ? (int64_t)k : -1));
    sd_index_clear(&ix);
    CHECK(ix.count == 0 && sd_index_get(&ix, 0x9e3779b97f4a7c15ULL) == -1);
    /* Shrinking: under 1/8 full halves (not below the floor); reset frees. */
    for (uint64_t k = 0; k < 1000; k++)
        CHECK(sd_index_put(&ix, k * 0x9e3779b97f4a7c15ULL, (int64_t)k) == 0);
    for (uint64_t k = 0; k < 990; k++)
        CHECK(sd_index_del(&ix, k * 0x9e3779b97f4a7c15ULL) == 1);
    CHECK(sd_index_fit(&ix, 16) == 0 && ix.mask + 1 == 64);
    for (uint64_t k = 0; k < 1000; k++)
        CHECK(sd_index_get(&ix, k * 0x9e3779b97f4a7c15ULL) == (k >= 990 ? (int64_t)k : -1));
    CHECK(sd_index_reset(&ix, 16) == 0 && ix.count == 0 && ix.mask + 1 == 16);
    sd_index_free(&ix);

    /* sd_slotix: the keys are the caller's; some share their high 32 bits. */
    enum { N = 3000 };
    static uint64_t keys[N];
    for (uint64_t s = 0; s < N; s++)
        keys[s] = s % 3 ? s * 0x9e3779b97f4a7c15ULL : (0x1234ULL << 32) | s;
    struct sd_slotix sx;
    CHECK(sd_slotix_init(&sx, 4) == 0);
    for (int64_t s = 0; s < N; s++)
        CHECK(sd_slotix_put(&sx, keys, keys[s], s) == 0);
    CHECK(sx.count == N);
    for (int64_t s = 0; s < N; s++)
        CHECK(sd_slotix_get(&sx, keys, keys[s]) == s);
    CHECK(sd_slotix_get(&sx, keys, (0x1234ULL << 32) | 1) == -1);   /* same high bits, absent */
    for (int64_t s = 0; s < N; s += 2)
        CHECK(sd_slotix_del(&sx, keys, keys[s]) == 1);
    for (int64_t s = 0; s < N; s++)
        CHECK(sd_slotix_get(&sx, keys, keys[s]) == (s % 2 ? s : -1));
    for (int64_t s = 1; s < N - 10; s += 2)
        CHECK(sd_slotix_del(&sx, keys, keys[s]) == 1);
    CHECK(sd_slotix_fit(&sx, keys, 16) == 0 && sx.mask + 1 == 32);   /* 5 left */
    for (int64_t s = 0; s < N; s++)
        CHECK(sd_slotix_get(&sx, keys, keys[s]) == (s % 2 && s >= N - 10 ? s : -1));
    CHECK(sd_slotix_reset(&sx, 16) == 0 && sx.count == 0);
    sd_slotix_free(&sx);
}

static void check_xxh64(void)
{
    /* Known answers of the reference implementation. */
    CHECK(sd_xxh64("", 0, 0) == 0xef46db3751d8e999ULL);
    CHECK(sd_xxh64("a", 1, 0) == 0xd24ec4f1a98c6e5bULL);
    CHECK(sd_xxh64("abc", 3, 0) == 0x44bc2cf5ad770999ULL);
    size_t ps = sd_page_size, n = 19;
    uint8_t *buf = malloc(n * ps);
    uint64_t *out = malloc(n * sizeof *out);
    CHECK(buf && out);
    for (size_t i = 0; i < n * ps; i++)
        buf[i] = (uint8_t)(i * 7 + i / ps);
    sd_xxh64_pages(buf, n, ps, 0, out);      /* SIMD lanes and the scalar tail */
    for (size_t i = 0; i < n; i++)
        CHECK(out[i] == sd_xxh64(buf + i * ps, ps, 0));
    memset(buf, 0, ps);
    CHECK(sd_page_is_zero(buf, ps) == 1);
    buf[ps - 1] = 1;
    CHECK(sd_page_is_zero(buf, ps) == 0);
    free(buf);
    free(out);
}

static int new_object(size_t pages)
{
    int fd = memfd_create("test_sd", MFD_CLOEXEC);
    CHECK(fd >= 0 && ftruncate(fd, (off_t)(pages * sd_page_size)) == 0);
    return fd;
}

static void check_pages(void)
{
    size_t ps = sd_page_size;
    int fd = new_object(8);
    uint8_t *page = malloc(ps), *out = malloc(2 * ps);
    CHECK(page && out);
    memset(page, 0xab, ps);
    CHECK(pwrite(fd, page, ps, (off_t)(3 * ps)) == (ssize_t)ps);
    CHECK(sd_resident_pages(fd, 0, 8 * ps) == 1);
    int64_t idx[2] = {3, 5};                  /* a written page and a hole */
    CHECK(sd_read_pages(fd, idx, 2, ps, out) == 0);
    CHECK(memcmp(out, page, ps) == 0);
    CHECK(out[ps] == 0 && out[2 * ps - 1] == 0);
    CHECK(sd_resident_pages(fd, 0, 8 * ps) == 1);    /* reading a hole allocates nothing */
    CHECK(sd_punch(fd, (off_t)(3 * ps), (off_t)ps) == 0);
    CHECK(sd_resident_pages(fd, 0, 8 * ps) == 0);
    free(page);
    free(out);
    close(fd);
}

/* sd_copy_pages: pages 2, 3 and 6 of a source copied to slots 5-7 of a
 * destination through a one-page buffer, checksummed as sd_hash_pages would;
 * a destination that cannot be written reports the pages written before. */
static void check_copy_pages(void)
{
    size_t ps = sd_page_size;
    int src = new_object(8), dst = new_object(0);
    uint8_t *want = malloc(8 * ps), *buf = malloc(ps), *got = malloc(ps);
    CHECK(want && buf && got);
    for (size_t i = 0; i < 8 * ps; i++)
        want[i] = (uint8_t)((i * 7) % 253);
    CHECK(pwrite(src, want, 8 * ps, 0) == (ssize_t)(8 * ps));
    int64_t idx[3] = {2, 3, 6};
    uint64_t h[3], ref;
    int err = -1;
    CHECK(sd_copy_pages(src, idx, 3, ps, buf, 1, h, dst, 5, &err) == 3 && err == 0);
    for (int i = 0; i < 3; i++) {
        CHECK(pread(dst, got, ps, (off_t)((5 + i) * ps)) == (ssize_t)ps);
        CHECK(memcmp(got, want + idx[i] * ps, ps) == 0);
        sd_hash_pages(want + idx[i] * ps, 1, ps, &ref);
        CHECK(h[i] == ref);
    }
    int ro = open("/dev/null", O_RDONLY);       /* writes fail: EBADF */
    CHECK(ro >= 0);
    CHECK(sd_copy_pages(src, idx, 3, ps, buf, 1, h, ro, 0, &err) == 0 && err == EBADF);
    close(ro);
    free(want);
    free(buf);
    free(got);
    close(src);
    close(dst);
}

/* A region of 4 pages merged onto slots 1-4 of a stable object, then broken
 * back: the bytes never change, the backing is punched while merged and holds
 * the pages again after the break. */
static void check_merge_and_break(void)
{
    size_t ps = sd_page_size, n = 4;
    int backing = new_object(n), stable = new_object(n + 1);
    uint8_t *state = calloc(n, 1), *result = calloc(n, 1), *want = malloc(n * ps);
    CHECK(state && result && want);
    for (size_t i = 0; i < n * ps; i++)
        want[i] = (uint8_t)(i % 251);
    CHECK(pwrite(stable, want, n * ps, (off_t)ps) == (ssize_t)(n * ps));
    uint8_t *base = mmap(NULL, n * ps, PROT_READ | PROT_WRITE, MAP_SHARED, backing, 0);
    uint8_t *view = mmap(NULL, (n + 1) * ps, PROT_READ, MAP_SHARED, stable, 0);
    CHECK(base != MAP_FAILED && view != MAP_FAILED);
    memcpy(base, want, n * ps);
    base[2 * ps] ^= 1;                        /* page 2 differs: stays private */
    uint64_t *ref = calloc(n, sizeof *ref);
    CHECK(ref);
    int idx = sd_region_add(base, n, backing, state, ref);
    CHECK(idx >= 0);
    struct sd_region *r = sd_region_get(idx);
    uint32_t tag = sd_view_add(view, (n + 1) * ps);
    CHECK(tag != 0);
    CHECK(sd_merge_run(r, 0, n, stable, view, tag, 1, result) == 3);
    CHECK(ref[0] == sd_view_ref(tag, 1) && ref[1] == sd_view_ref(tag, 2) && ref[2] == 0);
    unsigned long copied = sd_view_copied;
    CHECK(result[0] && result[1] && !result[2] && result[3]);
    CHECK(state[0] == SD_MERGED && state[2] == SD_PRIVATE);
    CHECK(sd_resident_pages(backing, 0, n * ps) == 1);
    base[2 * ps] ^= 1;
    CHECK(memcmp(base, want, n * ps) == 0);
    CHECK(sd_break_cow(r, 0, n) == 3);
    CHECK(sd_view_copied - copied == 3);          /* read from the view */
    for (size_t i = 0; i < n; i++)
        CHECK(state[i] == SD_PRIVATE && ref[i] == 0);
    CHECK(sd_resident_pages(backing, 0, n * ps) == (long)n);
    base[0] = 0x5a;                           /* writable again, and private */
    CHECK(view[ps] == want[0]);

    /* A stale reference: merged through a view that is then removed and its
     * place taken by another object with other bytes at the same slots.  The
     * break must not copy from the newcomer: it reads the page itself. */
    base[0] = want[0];
    CHECK(sd_merge_run(r, 0, 2, stable, view, tag, 1, result) == 2);
    sd_view_remove(tag);
    int other = new_object(n + 1);
    uint8_t *junk = malloc((n + 1) * ps);
    CHECK(junk);
    memset(junk, 0xee, (n + 1) * ps);
    CHECK(pwrite(other, junk, (n + 1) * ps, 0) == (ssize_t)((n + 1) * ps));
    uint8_t *view2 = mmap(NULL, (n + 1) * ps, PROT_READ, MAP_SHARED, other, 0);
    CHECK(view2 != MAP_FAILED);
    uint32_t tag2 = sd_view_add(view2, (n + 1) * ps);
    CHECK(tag2 != 0 && tag2 != tag);
    copied = sd_view_copied;
    CHECK(sd_break_cow(r, 0, 2) == 2);
    CHECK(sd_view_copied == copied);              /* not from any view */
    CHECK(memcmp(base, want, 2 * ps) == 0);
    sd_view_remove(tag2);
    munmap(view2, (n + 1) * ps);
    close(other);
    free(junk);

    sd_region_remove(idx);
    munmap(base, n * ps);
    munmap(view, (n + 1) * ps);
    close(backing);
    close(stable);
    free(state);
    free(result);
    free(want);
    free(ref);
}

static int unhex(const char *hex, uint8_t **out, size_t *len)
{
    size_t n = strlen(hex);
    if (n % 2)
        return -1;
    *out = malloc(n / 2 + 1);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        (*out)[i] = (uint8_t)v;
    }
    *len = n / 2;
    return 0;
}

int main(int argc, char **argv)
{
    sd_page_size = (size_t)sysconf(_SC_PAGESIZE);
    if (argc == 2 && strcmp(argv[1], "selftest") == 0) {
        check_index();
        check_xxh64();
        check_pages();
        check_copy_pages();
        check_merge_and_break();
        printf("ok\n");
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "murmur3") == 0) {
        uint8_t *data;
        size_t len;
        if (unhex(argv[2], &data, &len) < 0)
            return 2;
        uint64_t h[2];
        murmur3_x64_128(data, len, (uint32_t)strtoul(argv[3], NULL, 10), h);
        printf("%llu %llu\n", (unsigned long long)h[0], (unsigned long long)h[1]);
        free(data);
        return 0;
    }
    fprintf(stderr, "usage: test_sd selftest | test_sd murmur3 HEX SEED\n");
    return 2;
}
