/* sd_hash.c - XXH64, the page checksum (as Linux's calc_checksum uses it).
 *
 * The reference algorithm, written for little-endian x86-64 / aarch64
 * (unaligned loads done with memcpy, which compilers turn into plain loads).
 * Oracle in tests: xxhash.xxh64_intdigest().  sd_xxh64_pages() hashes eight pages at once with AVX-512 where the
 * CPU has it (one page per 64-bit lane: the same XXH64, ~2x the speed; the
 * scanner hashes every page it visits), and with sd_xxh64 elsewhere. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "sd_hash.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SD_HAVE_X8 1
#endif

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }


/* ---- XXH64 ---------------------------------------------------------------- */

static const uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL,
                      P3 = 0x165667B19E3779F9ULL, P4 = 0x85EBCA77C2B2AE63ULL,
                      P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t xxh_merge(uint64_t acc, uint64_t val)
{
    acc ^= xxh_round(0, val);
    return acc * P1 + P4;
}

uint64_t sd_xxh64(const void *data, size_t len, uint64_t seed)
{
    const uint8_t *p = data, *end = p + len;
    uint64_t h, k;
    uint32_t w;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t *limit = end - 32;
        do {
            uint64_t a, b, c, d;
            memcpy(&a, p, 8);
            memcpy(&b, p + 8, 8);
            memcpy(&c, p + 16, 8);
            memcpy(&d, p + 24, 8);
            v1 = xxh_round(v1, a);
            v2 = xxh_round(v2, b);
            v3 = xxh_round(v3, c);
            v4 = xxh_round(v4, d);
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        memcpy(&k, p, 8);
        h ^= xxh_round(0, k);
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        memcpy(&w, p, 4);
        h ^= (uint64_t)w * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= (*p++) * P5;
        h = rotl64(h, 11) * P1;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

/* ---- XXH64 of many pages ------------------------------------------------- */

#ifdef SD_HAVE_X8
#define SD_X8 __attribute__((target("avx512f,avx512dq")))

SD_X8 static inline __m512i x8_round(__m512i acc, __m512i in, __m512i p1, __m512i p2)
{
    acc = _mm512_add_epi64(acc, _mm512_mullo_epi64(in, p2));
    acc = _mm512_rol_epi64(acc, 31);
    return _mm512_mullo_epi64(acc, p1);
}

/* XXH64 (with any seed) of the 8 pages buf, buf + ps, ... (ps % 32 == 0): the
 * scalar algorithm lane by lane.  Each 32-byte stripe of the 8 pages is loaded
 * and transposed so that vector k holds word k of every page. */
SD_X8 static void xxh64_x8(const uint8_t *buf, size_t ps, uint64_t seed, uint64_t *out)
{
    const __m512i p1 = _mm512_set1_epi64((long long)P1), p2 = _mm512_set1_epi64((long long)P2);
    const __m512i ia = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
    const __m512i ib = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
    __m512i v1 = _mm512_set1_epi64((long long)(seed + P1 + P2)), v2 = _mm512_set1_epi64((long long)(seed + P2)),
            v3 = _mm512_set1_epi64((long long)seed), v4 = _mm512_set1_epi64((long long)(seed - P1));
    for (size_t o = 0; o < ps; o += 32) {
        __m512i z[4];
        for (int j = 0; j < 4; j++) {
            __m256i lo = _mm256_loadu_si256((const __m256i *)(const void *)(buf + (size_t)(2 * j) * ps + o));
            __m256i hi = _mm256_loadu_si256((const __m256i *)(const void *)(buf + (size_t)(2 * j + 1) * ps + o));
            z[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        /* a = words 0,1 and b = words 2,3 of pages 0-3 (z0, z1) and 4-7 (z2, z3). */
        __m512i a03 = _mm512_permutex2var_epi64(z[0], ia, z[1]);
        __m512i b03 = _mm512_permutex2var_epi64(z[0], ib, z[1]);
        __m512i a47 = _mm512_permutex2var_epi64(z[2], ia, z[3]);
        __m512i b47 = _mm512_permutex2var_epi64(z[2], ib, z[3]);
        v1 = x8_round(v1, _mm512_shuffle_i64x2(a03, a47, 0x44), p1, p2);
        v2 = x8_round(v2, _mm512_shuffle_i64x2(a03, a47, 0xEE), p1, p2);
        v3 = x8_round(v3, _mm512_shuffle_i64x2(b03, b47, 0x44), p1, p2);
        v4 = x8_round(v4, _mm512_shuffle_i64x2(b03, b47, 0xEE), p1, p2);
    }
    __m512i h = _mm512_add_epi64(_mm512_add_epi64(_mm512_rol_epi64(v1, 1), _mm512_rol_epi64(v2, 7)),
                                 _mm512_add_epi64(_mm512_rol_epi64(v3, 12), _mm512_rol_epi64(v4, 18)));
    const __m512i p4 = _mm512_set1_epi64((long long)P4), zero = _mm512_setzero_si512();
    const __m512i v[4] = {v1, v2, v3, v4};
    for (int k = 0; k < 4; k++) {
        h = _mm512_xor_si512(h, x8_round(zero, v[k], p1, p2));
        h = _mm512_add_epi64(_mm512_mullo_epi64(h, p1), p4);
    }
    h = _mm512_add_epi64(h, _mm512_set1_epi64((long long)ps));
    h = _mm512_xor_si512(h, _mm512_srli_epi64(h, 33));
    h = _mm512_mullo_epi64(h, p2);
    h = _mm512_xor_si512(h, _mm512_srli_epi64(h, 29));
    h = _mm512_mullo_epi64(h, _mm512_set1_epi64((long long)P3));
    h = _mm512_xor_si512(h, _mm512_srli_epi64(h, 32));
    _mm512_storeu_si512((void *)out, h);
}
#endif

int sd_hash_simd(void)
{
    /* Decided once (module init calls this first); every thread would decide the same. */
    static atomic_int decided = -1;
    int simd = atomic_load_explicit(&decided, memory_order_relaxed);
    if (simd < 0) {
        int on = 0;
#ifdef SD_HAVE_X8
        __builtin_cpu_init();
        const char *off = getenv("SHMDEDUP_NO_SIMD");
        on = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
             && !(off && *off && strcmp(off, "0") != 0);
#endif
        simd = on;
        atomic_store_explicit(&decided, simd, memory_order_relaxed);
    }
    return simd;
}

void sd_xxh64_pages(const uint8_t *buf, size_t n, size_t page_size, uint64_t seed, uint64_t *out)
{
    size_t i = 0;
#ifdef SD_HAVE_X8
    if (page_size >= 32 && page_size % 32 == 0 && sd_hash_simd())
        for (; i + 8 <= n; i += 8)
            xxh64_x8(buf + i * page_size, page_size, seed, out + i);
#endif
    for (; i < n; i++)
        out[i] = sd_xxh64(buf + i * page_size, page_size, seed);
}
