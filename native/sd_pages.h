/* sd_pages.h - reading, hashing, comparing and punching pages of shm objects.
 * Plain C (no Python.h).  Every function returns -1 with errno set on failure. */
#ifndef SD_PAGES_H
#define SD_PAGES_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Read the pages idx[0..n) of fd into out (n * page_size bytes) with pread,
 * one call per run of consecutive indexes.  Never maps the object, so reading a
 * hole allocates nothing (DESIGN invariant 4).  Bytes past EOF read as zero. */
int sd_read_pages(int fd, const int64_t *idx, size_t n, size_t page_size, uint8_t *out);

/* out[i] = checksum of page i of buf. */
void sd_hash_pages(const uint8_t *buf, size_t n, size_t page_size, uint64_t *out);

/* The pages idx[0..n) of fd, copied to consecutive pages of dst_fd from
 * dst_first on and checksummed (hashes[i]), buf_pages at a time through buf
 * (read, hashed and written while it is in cache: one pass over memory where
 * reading all, then writing all, makes two).  Returns the pages written: n,
 * or fewer with *err set when a write failed (ENOSPC: the pages before are
 * written, none after); -1 with errno when a read failed (nothing to keep). */
long sd_copy_pages(int fd, const int64_t *idx, size_t n, size_t page_size, uint8_t *buf,
                   size_t buf_pages, uint64_t *hashes, int dst_fd, int64_t dst_first, int *err);

/* eq[i] = 1 if page buf_idx[i] of buf equals page slots[i] of fd (any shm
 * object: stable slots, or a worker's pages).  The fd's pages are read with
 * pread into a scratch buffer, one call per run of consecutive slots (at most
 * 64 pages): never mapped (DESIGN invariant 4).  Bytes past EOF read as zero.
 * Returns 0, or -1 with errno set. */
int sd_compare_slots(const uint8_t *buf, const int64_t *buf_idx, int fd, const int64_t *slots,
                     size_t n, size_t page_size, uint8_t *eq);

/* 1 if the page is all zero bytes. */
int sd_page_is_zero(const uint8_t *page, size_t page_size);

/* Pages of [offset, offset + length) in the page cache, by cachestat(2)
 * (Linux 6.5): one call, whatever the range, where SEEK_HOLE walks to the
 * next hole.  -1 with errno (ENOSYS on older kernels). */
long sd_resident_pages(int fd, off_t offset, size_t length);

/* Pages of [offset, offset + length) that hold data, in memory or swapped out
 * (cachestat's cache + evicted: a shm object's page on swap is an evicted
 * entry); 0 for an empty range.  Unlike SEEK_DATA it takes no lock that a
 * writer of the object holds: a write(2) holds the inode lock while it faults
 * its source in, which its writer can make last.  -1 with errno (ENOSYS on
 * kernels before 6.5). */
long sd_data_pages(int fd, off_t offset, size_t length);

/* mask[i] = 1 if page first + i holds data, for i < n, by bisection with
 * sd_data_pages: one call for a range all data or all holes, about two per
 * run of each otherwise.  Each call is a snapshot: a page written or
 * punched meanwhile may be reported either way.  Returns 0, or -1 with errno. */
int sd_data_mask(int fd, size_t first, size_t n, size_t page_size, uint8_t *mask);

/* The first page of [first, first + n) that holds data: windows doubling
 * from first, then halving the one that holds data (cachestat walks its whole
 * range, so a page d pages on costs O(d) entries and O(log d) calls); -1 if
 * none, -2 with errno on error.  A snapshot, as above. */
long long sd_first_data(int fd, size_t first, size_t n, size_t page_size);

/* fallocate(PUNCH_HOLE | KEEP_SIZE): give the pages' memory back, keep the size. */
int sd_punch(int fd, off_t offset, off_t length);
#endif
