/* sd_pages.c - page I/O for the scanner: pread (never a mapping, so holes stay
 * holes), checksums, zero test, hole punching. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sd_hash.h"
#include "sd_pages.h"

static int pread_full(int fd, uint8_t *buf, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t r = pread(fd, buf, len, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {           /* past EOF: the object shrank; zeros, like a hole */
            memset(buf, 0, len);
            return 0;
        }
        buf += r;
        len -= (size_t)r;
        off += r;
    }
    return 0;
}

int sd_read_pages(int fd, const int64_t *idx, size_t n, size_t page_size, uint8_t *out)
{
    size_t i = 0;
    while (i < n) {
        size_t j = i + 1;
        while (j < n && idx[j] == idx[j - 1] + 1)
            j++;
        if (idx[i] < 0) {
            errno = EINVAL;
            return -1;
        }
        if (pread_full(fd, out + i * page_size, (j - i) * page_size,
                       (off_t)idx[i] * (off_t)page_size) < 0)
            return -1;
        i = j;
    }
    return 0;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t w = pwrite(fd, buf, len, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (w == 0) {           /* no progress: as good as full */
            errno = ENOSPC;
            return -1;
        }
        buf += w;
        len -= (size_t)w;
        off += w;
    }
    return 0;
}

long sd_copy_pages(int fd, const int64_t *idx, size_t n, size_t page_size, uint8_t *buf,
                   size_t buf_pages, uint64_t *hashes, int dst_fd, int64_t dst_first, int *err)
{
    *err = 0;
    size_t i = 0;
    while (i < n) {
        size_t m = n - i < buf_pages ? n - i : buf_pages;
        if (sd_read_pages(fd, idx + i, m, page_size, buf) < 0)
            return -1;
        sd_hash_pages(buf, m, page_size, hashes + i);
        if (pwrite_full(dst_fd, buf, m * page_size, (off_t)(dst_first + (int64_t)i) * (off_t)page_size) < 0) {
            *err = errno;
            return (long)i;           /* pages [0, i) are written: the caller keeps them */
        }
        i += m;
    }
    return (long)n;
}

void sd_hash_pages(const uint8_t *buf, size_t n, size_t page_size, uint64_t *out)
{
    sd_xxh64_pages(buf, n, page_size, 0, out);      /* sd_page_checksum of each page */
}

/* Pages read per pread when comparing: runs of consecutive slots (new stable
 * slots are allocated in runs, unstable mates come in runs) cost one system
 * call per 64 pages instead of one per page, in a scratch that stays in cache. */
#define CMP_BATCH 64

int sd_compare_slots(const uint8_t *buf, const int64_t *buf_idx, int fd, const int64_t *slots,
                     size_t n, size_t page_size, uint8_t *eq)
{
    if (n == 0)
        return 0;
    uint8_t *scratch = malloc((n < CMP_BATCH ? n : CMP_BATCH) * page_size);
    if (!scratch)
        return -1;
    size_t i = 0;
    while (i < n) {
        size_t j = i + 1;
        while (j < n && j - i < CMP_BATCH && slots[j] == slots[j - 1] + 1)
            j++;
        if (pread_full(fd, scratch, (j - i) * page_size, (off_t)slots[i] * (off_t)page_size) < 0) {
            int err = errno;
            free(scratch);
            errno = err;
            return -1;
        }
        for (size_t k = i; k < j; k++)
            eq[k] = memcmp(buf + (size_t)buf_idx[k] * page_size, scratch + (k - i) * page_size,
                           page_size) == 0;
        i = j;
    }
    free(scratch);
    return 0;
}

int sd_page_is_zero(const uint8_t *page, size_t page_size)
{
    const uint64_t *w = (const uint64_t *)page;
    uint64_t acc = 0;
    for (size_t i = 0; i < page_size / 8; i++)
        acc |= w[i];
    return acc == 0;
}

int sd_punch(int fd, off_t offset, off_t length)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

#ifndef __NR_cachestat
#define __NR_cachestat 451     /* the same on every architecture (unified table) */
#endif

struct sd_cachestat_range { uint64_t off, len; };
struct sd_cachestat { uint64_t cache, dirty, writeback, evicted, recently_evicted; };

long sd_resident_pages(int fd, off_t offset, size_t length)
{
    struct sd_cachestat_range r = {(uint64_t)offset, (uint64_t)length};
    struct sd_cachestat cs;
    if (syscall(__NR_cachestat, fd, &r, &cs, 0) != 0)
        return -1;
    return (long)cs.cache;
}

long sd_data_pages(int fd, off_t offset, size_t length)
{
    if (length == 0)
        return 0;                   /* cachestat reads a length of 0 as "to the end" */
    struct sd_cachestat_range r = {(uint64_t)offset, (uint64_t)length};
    struct sd_cachestat cs;
    if (syscall(__NR_cachestat, fd, &r, &cs, 0) != 0)
        return -1;
    return (long)(cs.cache + cs.evicted);
}

/* Fill mask[0, n) for pages [a, a + n), of which cnt hold data. */
static int data_fill(int fd, size_t a, size_t n, long cnt, size_t page_size, uint8_t *mask)
{
    if (cnt <= 0 || (size_t)cnt >= n) {
        memset(mask, cnt > 0, n);
        return 0;
    }
    size_t h = n / 2;
    long left = sd_data_pages(fd, (off_t)(a * page_size), h * page_size);
    if (left < 0 || data_fill(fd, a, h, left, page_size, mask) < 0)
        return -1;
    /* cnt - left: snapshots may disagree, a hint either way */
    return data_fill(fd, a + h, n - h, cnt - left, page_size, mask + h);
}

int sd_data_mask(int fd, size_t first, size_t n, size_t page_size, uint8_t *mask)
{
    long cnt = sd_data_pages(fd, (off_t)(first * page_size), n * page_size);
    if (cnt < 0)
        return -1;
    return data_fill(fd, first, n, cnt, page_size, mask);
}

long long sd_first_data(int fd, size_t first, size_t n, size_t page_size)
{
    /* cachestat walks every entry of its range: gallop from `first` (windows
     * of 1, 2, 4, ... pages), then halve the window that holds data, so a
     * page d pages on costs about 4d entries, not the rest of the object. */
    size_t end = first + n, w = 1;
    while (first < end) {
        size_t len = w < end - first ? w : end - first;
        long cnt = sd_data_pages(fd, (off_t)(first * page_size), len * page_size);
        if (cnt < 0)
            return -2;
        if (cnt > 0) {
            while (len > 1) {
                size_t h = len / 2;
                long left = sd_data_pages(fd, (off_t)(first * page_size), h * page_size);
                if (left < 0)
                    return -2;
                if (left == 0) {
                    first += h;
                    len -= h;
                } else {
                    len = h;
                }
            }
            return (long long)first;
        }
        first += len;
        if (w < ((size_t)1 << 40))
            w *= 2;
    }
    return -1;
}
