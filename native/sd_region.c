/* sd_region.c - the table of this process's regions.
 *
 * Each region is one mapping of a backing object plus its state bytes (one
 * per page, shared with the coordinator, which only reads them).  The SIGSEGV
 * trap looks regions up by address from a signal handler, so lookups read the
 * table with atomics only; adds and removes serialise on a mutex and publish
 * a slot by storing its base last (release), and free it by storing 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sys/mman.h>
#include "sd_region.h"

size_t sd_page_size;
_Atomic long sd_merged_pages;

static struct sd_region regions[SD_MAX_REGIONS];
static _Atomic int regions_used;            /* high-water mark of the table */
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

int sd_region_add(void *base, size_t npages, int fd, uint8_t *state, uint64_t *ref)
{
    pthread_mutex_lock(&table_lock);
    for (int i = 0; i < SD_MAX_REGIONS; i++) {
        struct sd_region *r = &regions[i];
        if (atomic_load(&r->base) != 0)
            continue;
        r->npages = npages;
        r->fd = fd;
        r->state = (_Atomic uint8_t *)state;
        r->ref = (_Atomic uint64_t *)ref;
        atomic_store(&r->breaks, 0);
        atomic_store(&r->ahead_end, SIZE_MAX);
        atomic_store(&r->ahead_width, 0);
        atomic_store_explicit(&r->base, (uintptr_t)base, memory_order_release);
        if (i + 1 > atomic_load(&regions_used))
            atomic_store(&regions_used, i + 1);
        pthread_mutex_unlock(&table_lock);
        return i;
    }
    pthread_mutex_unlock(&table_lock);
    errno = ENOSPC;
    return -1;
}

void sd_region_remove(int idx)
{
    struct sd_region *r = &regions[idx];
    long merged = 0;
    for (size_t i = 0; i < r->npages; i++) {
        uint8_t s = atomic_load(&r->state[i]);
        merged += sd_is_merged(s);
    }
    atomic_fetch_sub(&sd_merged_pages, merged);
    atomic_store_explicit(&r->base, 0, memory_order_release);
}

struct sd_region *sd_region_get(int idx)
{
    return &regions[idx];
}

struct sd_region *sd_region_find(uintptr_t addr, size_t *page)
{
    int n = atomic_load(&regions_used);
    for (int i = 0; i < n; i++) {
        uintptr_t b = atomic_load_explicit(&regions[i].base, memory_order_acquire);
        if (b && addr >= b && addr - b < regions[i].npages * sd_page_size) {
            *page = (addr - b) / sd_page_size;
            return &regions[i];
        }
    }
    return NULL;
}

void sd_region_unmap_all(void)
{
    int n = atomic_load(&regions_used);
    for (int i = 0; i < n; i++) {
        uintptr_t b = atomic_load(&regions[i].base);
        if (!b)
            continue;
        atomic_store(&regions[i].base, 0);
        munmap((void *)b, regions[i].npages * sd_page_size);
    }
    atomic_store(&sd_merged_pages, 0);
}
