/* module.c - shmdedup._native: the Python binding of the C core.
 *
 * Thin by design (psutil style): argument checks, one call into sd_*.c with the
 * GIL released around every loop, results built, errors raised through
 * sd_raise_errno() which names the system call.  Policy lives in Python.
 * This file holds the module's functions; the types live beside it:
 * py_mapping.c (Mapping, StableView) and py_index.c (HashIndex, SlotIndex).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdatomic.h>
#include <unistd.h>
#include "py_index.h"
#include "py_mapping.h"
#include "sd_fault.h"
#include "sd_hash.h"
#include "sd_merge.h"
#include "sd_pages.h"
#include "sd_trap.h"
#include "py_testhooks.h"

PyObject *
sd_raise_errno(const char *syscall)
{
    int err = errno;
    PyObject *msg = PyUnicode_FromFormat("%s: %s", syscall, strerror(err));
    if (msg) {
        PyObject *args = Py_BuildValue("(iO)", err, msg);
        if (args) {
            PyErr_SetObject(PyExc_OSError, args);
            Py_DECREF(args);
        }
        Py_DECREF(msg);
    }
    return NULL;
}

/* ---- functions ---------------------------------------------------------- */

static PyObject *
py_xxh64(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer b;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &b, &seed))
        return NULL;
    uint64_t h;
    Py_BEGIN_ALLOW_THREADS
    h = sd_xxh64(b.buf, (size_t)b.len, seed);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

static int
check_pages(Py_buffer *b, const char *name, size_t *n)
{
    if (b->len % (Py_ssize_t)sd_page_size != 0) {
        PyErr_Format(PyExc_ValueError, "%s: length %zd is not a multiple of the page size %zu",
                     name, b->len, sd_page_size);
        return -1;
    }
    *n = (size_t)b->len / sd_page_size;
    return 0;
}

/* hash_pages(buf) -> bytes of n little-endian uint64 checksums. */
static PyObject *
py_hash_pages(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer b;
    size_t n;
    if (!PyArg_ParseTuple(args, "y*", &b))
        return NULL;
    PyObject *out = NULL;
    if (check_pages(&b, "hash_pages", &n) == 0 && (out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8)))) {
        uint64_t *h = (uint64_t *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        sd_hash_pages(b.buf, n, sd_page_size, h);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    return out;
}

/* Page numbers of a file: none negative, and idx * page_size must fit off_t
 * (a wrapped offset would read another page).  -1 with ValueError set. */
static int check_page_idx(const int64_t *ix, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (ix[i] < 0) {
            PyErr_Format(PyExc_ValueError, "idx[%zu] = %lld is negative", i, (long long)ix[i]);
            return -1;
        }
        if ((uint64_t)ix[i] > (uint64_t)INT64_MAX / sd_page_size) {
            PyErr_Format(PyExc_ValueError, "idx[%zu] = %lld is past the largest file offset", i, (long long)ix[i]);
            return -1;
        }
    }
    return 0;
}

/* Pages read, then hashed, at a time by read_pages (256 KiB: stays in L2). */
#define READ_HASH_PIECE 64

/* read_pages(fd, idx, out[, hashes]): pread pages idx (int64 buffer) into out
 * (len(idx) pages), and their checksums into hashes (uint64 buffer) if given. */
static PyObject *
py_read_pages(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd;
    Py_buffer idx, out, hashes = {0};
    if (!PyArg_ParseTuple(args, "iy*w*|w*", &fd, &idx, &out, &hashes))
        return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)idx.len / 8, nout;
    if (idx.len % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "idx must be a buffer of int64");
        goto done;
    }
    if (check_pages(&out, "out", &nout) < 0)
        goto done;
    if (nout < n) {
        PyErr_Format(PyExc_ValueError, "out holds %zu pages, %zu needed", nout, n);
        goto done;
    }
    if (hashes.obj && (size_t)hashes.len < n * 8) {
        PyErr_Format(PyExc_ValueError, "hashes holds %zd bytes, %zu needed", hashes.len, n * 8);
        goto done;
    }
    const int64_t *ix = idx.buf;
    if (check_page_idx(ix, n) < 0)
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (!hashes.obj)
        rc = sd_read_pages(fd, ix, n, sd_page_size, out.buf);
    else {
        /* Read and hash a piece at a time, so that the hash reads pages still
         * in cache (one pass over memory, not two; a run longer than a piece
         * costs one more pread per piece). */
        rc = 0;
        for (size_t i = 0; i < n && rc == 0; i += READ_HASH_PIECE) {
            size_t m = n - i < READ_HASH_PIECE ? n - i : READ_HASH_PIECE;
            uint8_t *at = (uint8_t *)out.buf + i * sd_page_size;
            rc = sd_read_pages(fd, ix + i, m, sd_page_size, at);
            if (rc == 0)
                sd_hash_pages(at, m, sd_page_size, (uint64_t *)hashes.buf + i);
        }
    }
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        sd_raise_errno("pread");
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&idx);
    PyBuffer_Release(&out);
    if (hashes.obj)
        PyBuffer_Release(&hashes);
    return ret;
}

/* copy_pages(fd, idx, buf, hashes, dst_fd, dst_first) -> (written, errno):
 * sd_copy_pages through buf (a whole number of pages, at least one). */
static PyObject *
py_copy_pages(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd, dst_fd;
    long long dst_first;
    Py_buffer idx, buf, hashes;
    if (!PyArg_ParseTuple(args, "iy*w*w*iL", &fd, &idx, &buf, &hashes, &dst_fd, &dst_first))
        return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)idx.len / 8, nbuf;
    if (idx.len % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "idx must be a buffer of int64");
        goto done;
    }
    if (check_pages(&buf, "buf", &nbuf) < 0)
        goto done;
    if (nbuf == 0) {
        PyErr_SetString(PyExc_ValueError, "buf must hold at least one page");
        goto done;
    }
    if ((size_t)hashes.len < n * 8) {
        PyErr_Format(PyExc_ValueError, "hashes holds %zd bytes, %zu needed", hashes.len, n * 8);
        goto done;
    }
    if (dst_first < 0 || (uint64_t)dst_first + n > (uint64_t)INT64_MAX / sd_page_size) {
        PyErr_Format(PyExc_ValueError, "dst_first = %lld is out of range", dst_first);
        goto done;
    }
    const int64_t *ix = idx.buf;
    if (check_page_idx(ix, n) < 0)
        goto done;
    long got;
    int err;
    Py_BEGIN_ALLOW_THREADS
    got = sd_copy_pages(fd, ix, n, sd_page_size, buf.buf, nbuf, hashes.buf, dst_fd,
                        (int64_t)dst_first, &err);
    Py_END_ALLOW_THREADS
    if (got < 0)
        sd_raise_errno("pread");
    else
        ret = Py_BuildValue("(li)", got, err);
done:
    PyBuffer_Release(&idx);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&hashes);
    return ret;
}

static PyObject *
py_pages_equal(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b))
        return NULL;
    int eq;
    if (a.len != b.len)
        eq = 0;
    else {
        Py_BEGIN_ALLOW_THREADS
        eq = memcmp(a.buf, b.buf, (size_t)a.len) == 0;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBool_FromLong(eq);
}

/* compare_slots(buf, buf_idx, fd, slots) -> bytes: 1 where page buf_idx[i] of
 * buf equals page slots[i] of fd (both int64 buffers of the same length); fd is
 * the stable segment, or a worker's backing object (unstable mates). */
static PyObject *
py_compare_slots(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer buf, bidx, slots;
    int fd;
    if (!PyArg_ParseTuple(args, "y*y*iy*", &buf, &bidx, &fd, &slots))
        return NULL;
    PyObject *out = NULL;
    size_t npages, n = (size_t)bidx.len / 8;
    if (check_pages(&buf, "buf", &npages) < 0)
        goto done;
    if (bidx.len % 8 || slots.len != bidx.len) {
        PyErr_SetString(PyExc_ValueError, "buf_idx and slots must be int64 buffers of the same length");
        goto done;
    }
    const int64_t *bi = bidx.buf, *sl = slots.buf;
    for (size_t i = 0; i < n; i++)
        if (bi[i] < 0 || (size_t)bi[i] >= npages || sl[i] < 0
                || (uint64_t)sl[i] > (uint64_t)INT64_MAX / sd_page_size) {
            PyErr_Format(PyExc_ValueError, "entry %zu: page %lld / slot %lld out of range",
                         i, (long long)bi[i], (long long)sl[i]);
            goto done;
        }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!out)
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sd_compare_slots(buf.buf, bi, fd, sl, n, sd_page_size, (uint8_t *)PyBytes_AS_STRING(out));
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_CLEAR(out);
        sd_raise_errno("pread");
    }
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&bidx);
    PyBuffer_Release(&slots);
    return out;
}

static PyObject *
py_is_zero(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer b;
    size_t n;
    if (!PyArg_ParseTuple(args, "y*", &b))
        return NULL;
    int z = 0;
    if (check_pages(&b, "is_zero", &n) == 0) {
        z = 1;
        for (size_t i = 0; i < n && z; i++)
            z = sd_page_is_zero((const uint8_t *)b.buf + i * sd_page_size, sd_page_size);
    }
    PyBuffer_Release(&b);
    if (PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(z);
}

/* (fd, offset, length) with offset and length >= 0; 0, or -1 with an error set. */
static int
parse_fd_range(PyObject *args, int *fd, long long *off, long long *len)
{
    if (!PyArg_ParseTuple(args, "iLL", fd, off, len))
        return -1;
    if (*off < 0 || *len < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and length must be >= 0");
        return -1;
    }
    return 0;
}

static PyObject *
py_punch_hole(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd;
    long long off, len;
    if (parse_fd_range(args, &fd, &off, &len) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sd_punch(fd, (off_t)off, (off_t)len);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return sd_raise_errno("fallocate(PUNCH_HOLE)");
    Py_RETURN_NONE;
}

/* (fd, offset, length) -> count(fd, offset, length), a cachestat count. */
static PyObject *
cachestat_count(PyObject *args, long (*count)(int, off_t, size_t))
{
    int fd;
    long long off, len;
    if (parse_fd_range(args, &fd, &off, &len) < 0)
        return NULL;
    long n = count(fd, (off_t)off, (size_t)len);
    if (n < 0)
        return sd_raise_errno("cachestat");
    return PyLong_FromLong(n);
}

static PyObject *
py_resident_pages(PyObject *Py_UNUSED(m), PyObject *args)
{
    return cachestat_count(args, sd_resident_pages);
}

static PyObject *
py_data_pages(PyObject *Py_UNUSED(m), PyObject *args)
{
    return cachestat_count(args, sd_data_pages);
}

/* (fd, first page, page count): checked, and small enough that byte offsets fit. */
static int
parse_fd_pages(PyObject *args, int *fd, long long *first, long long *n)
{
    if (!PyArg_ParseTuple(args, "iLL", fd, first, n))
        return -1;
    long long limit = (long long)(INT64_MAX / (int64_t)sd_page_size);
    if (*first < 0 || *n < 0 || *first > limit || *n > limit - *first) {
        PyErr_SetString(PyExc_ValueError, "first and n must be >= 0, and the range within a file's size");
        return -1;
    }
    return 0;
}

static PyObject *
py_data_mask(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd;
    long long first, n;
    if (parse_fd_pages(args, &fd, &first, &n) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out == NULL)
        return NULL;
    if (n > 0 && sd_data_mask(fd, (size_t)first, (size_t)n, sd_page_size,
                              (uint8_t *)PyBytes_AS_STRING(out)) < 0) {
        Py_DECREF(out);
        return sd_raise_errno("cachestat");
    }
    return out;
}

static PyObject *
py_first_data(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd;
    long long first, n;
    if (parse_fd_pages(args, &fd, &first, &n) < 0)
        return NULL;
    long long p = n > 0 ? sd_first_data(fd, (size_t)first, (size_t)n, sd_page_size) : -1;
    if (p == -2)
        return sd_raise_errno("cachestat");
    if (p < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(p);
}

static PyObject *
py_trap_install(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    int rc = sd_trap_install();
    if (rc < 0)
        return sd_raise_errno("sigaction(SIGSEGV)");
    return PyBool_FromLong(rc);
}

static PyObject *
py_trim_heap(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    /* glibc keeps freed heap memory (and, once a big block was freed, serves
     * big temporaries from the heap too): give whole free pages back. */
    int released = 0;
#ifdef __GLIBC__
    Py_BEGIN_ALLOW_THREADS
    released = malloc_trim(0);
    Py_END_ALLOW_THREADS
#endif
    return PyBool_FromLong(released);
}

static PyObject *
py_fault_around(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *arg = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &arg))
        return NULL;
    size_t old = atomic_load(&sd_fault_around_max);
    if (arg != Py_None) {
        if (!PyLong_Check(arg) || PyBool_Check(arg)) {
            PyErr_Format(PyExc_TypeError, "pages must be an int, not %.100s", Py_TYPE(arg)->tp_name);
            return NULL;
        }
        long long v = PyLong_AsLongLong(arg);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < 1 || v > SD_FAULT_AROUND_LIMIT) {
            PyErr_Format(PyExc_ValueError, "pages must be between 1 and %d, got %lld",
                         SD_FAULT_AROUND_LIMIT, v);
            return NULL;
        }
        atomic_store(&sd_fault_around_max, (size_t)v);
    }
    return PyLong_FromSize_t(old);
}

static PyObject *
py_trap_in_front(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(sd_trap_in_front());
}

static PyObject *
py_merged_pages(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(atomic_load(&sd_merged_pages));
}

static PyMethodDef module_methods[] = {
    {"xxh64", py_xxh64, METH_VARARGS, "xxh64(data, seed=0) -> int, as xxhash.xxh64_intdigest."},
    {"hash_pages", py_hash_pages, METH_VARARGS, "hash_pages(buf) -> bytes: uint64 checksum (XXH64) of each page."},
    {"read_pages", py_read_pages, METH_VARARGS, "read_pages(fd, idx, out[, hashes]): pread pages (and checksum them)."},
    {"pages_equal", py_pages_equal, METH_VARARGS, "pages_equal(a, b) -> bool (memcmp)."},
    {"copy_pages", py_copy_pages, METH_VARARGS,
     "copy_pages(fd, idx, buf, hashes, dst_fd, dst_first) -> (written, errno): copy and checksum pages."},
    {"compare_slots", py_compare_slots, METH_VARARGS,
     "compare_slots(buf, buf_idx, fd, slots) -> bytes: page-by-page equality with slots of fd."},
    {"is_zero", py_is_zero, METH_VARARGS, "is_zero(buf) -> bool: all pages are zero."},
    {"punch_hole", py_punch_hole, METH_VARARGS, "punch_hole(fd, offset, length): fallocate PUNCH_HOLE|KEEP_SIZE."},
    {"resident_pages", py_resident_pages, METH_VARARGS,
     "resident_pages(fd, offset, length) -> pages of the range in memory (cachestat)."},
    {"data_pages", py_data_pages, METH_VARARGS,
     "data_pages(fd, offset, length) -> pages of the range that hold data, in memory or swapped "
     "out (cachestat: no lock a writer of the object holds, unlike SEEK_DATA)."},
    {"data_mask", py_data_mask, METH_VARARGS,
     "data_mask(fd, first, n) -> bytes: 1 for each page of [first, first + n) that holds data "
     "(a snapshot, by bisection with data_pages)."},
    {"first_data", py_first_data, METH_VARARGS,
     "first_data(fd, first, n) -> the first page of [first, first + n) that holds data, or None."},
    {"trim_heap", py_trim_heap, METH_NOARGS,
     "trim_heap() -> bool: return free heap pages to the system (malloc_trim; False elsewhere)."},
    {"fault_around", py_fault_around, METH_VARARGS,
     "fault_around([pages]) -> int: the widest COW fault-around in pages (1 = off); sets it if given, "
     "returns the previous value."},
    {"trap_install", py_trap_install, METH_NOARGS, "Install the COW trap in front; True if it (re)installed."},
    {"trap_in_front", py_trap_in_front, METH_NOARGS, "True if the COW trap is the installed SIGSEGV handler."},
    {"merged_pages", py_merged_pages, METH_NOARGS, "Pages merged (MERGED or ZERO) in this process."},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmdedup._native",
    .m_doc = "The C core of shmdedup.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    sd_page_size = (size_t)sysconf(_SC_PAGESIZE);
    if (PyType_Ready(&sd_MappingType) < 0 || PyType_Ready(&sd_StableViewType) < 0 ||
        PyType_Ready(&sd_HashIndexType) < 0 || PyType_Ready(&sd_SlotIndexType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&sd_MappingType);
    Py_INCREF(&sd_StableViewType);
    Py_INCREF(&sd_HashIndexType);
    Py_INCREF(&sd_SlotIndexType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&sd_MappingType) < 0 ||
        PyModule_AddObject(m, "StableView", (PyObject *)&sd_StableViewType) < 0 ||
        PyModule_AddObject(m, "HashIndex", (PyObject *)&sd_HashIndexType) < 0 ||
        PyModule_AddObject(m, "SlotIndex", (PyObject *)&sd_SlotIndexType) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", (long)sd_page_size) < 0 ||
        PyModule_AddIntConstant(m, "FAULT_AROUND_LIMIT", SD_FAULT_AROUND_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "PRIVATE", SD_PRIVATE) < 0 ||
        PyModule_AddIntConstant(m, "MERGING", SD_MERGING) < 0 ||
        PyModule_AddIntConstant(m, "MERGED", SD_MERGED) < 0 ||
        PyModule_AddIntConstant(m, "BREAKING", SD_BREAKING) < 0 ||
        PyModule_AddIntConstant(m, "ZERO", SD_ZERO) < 0 ||
        PyModule_AddIntConstant(m, "HASH_SIMD", sd_hash_simd()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (sd_add_test_hooks(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
