/* module.c - shmdedup._native: the Python binding of the C core.
 *
 * Thin by design (psutil style): argument checks, one call into sd_*.c with the
 * GIL released around every loop, results built, errors raised through
 * raise_errno() which names the system call.  Policy lives in Python.
 *
 * Types:
 *   Mapping     a region's memory: the backing mapped MAP_SHARED read-write plus
 *               its state bytes, registered with the trap; exports a writable
 *               buffer; merge() and break_range() act on it.
 *   StableView  a worker's read-only view of the coordinator's stable object,
 *               the other side of every merge proof.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "py_index.h"
#include "sd_fault.h"
#include "sd_hash.h"
#include "sd_merge.h"
#include "sd_pages.h"
#include "sd_trap.h"

/* Address space a StableView reserves: the stable object may grow up to this
 * without remapping (it is virtual: nothing is committed). */
#define STABLE_RESERVE ((size_t)1 << 38)

static PyObject *
raise_errno(const char *syscall)
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

/* ---- Mapping ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int idx;            /* region table slot; -1 once closed */
    uint8_t *base;
    size_t npages;
    int fd;             /* dup of the backing fd: same open file, so remaps coalesce */
    uint8_t *state;
    size_t state_len;
    Py_ssize_t exports; /* buffers handed out */
    Py_ssize_t busy;    /* calls running with the GIL released */
    pid_t pid;          /* regions are not inherited across fork */
} MappingObject;

static int
mapping_check_open(MappingObject *self)
{
    if (self->idx < 0 || self->pid != getpid()) {
        /* The package's RegionClosedError (a ValueError), so that memoryview(),
         * states() and merge() fail like Region's Python methods do. */
        PyObject *exc = PyExc_ValueError, *errors = PyImport_ImportModule("shmdedup.errors");
        PyObject *cls = errors ? PyObject_GetAttrString(errors, "RegionClosedError") : NULL;
        Py_XDECREF(errors);
        PyErr_Clear();
        if (cls && PyType_Check(cls) && PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_ValueError))
            exc = cls;
        PyErr_SetString(exc, self->idx < 0 ? "region is closed"
                                           : "region belongs to the parent process (regions are not inherited across fork)");
        Py_XDECREF(cls);
        return -1;
    }
    return 0;
}

static int
Mapping_init(MappingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"backing_fd", "meta_fd", "npages", NULL};
    int bfd, mfd;
    Py_ssize_t npages;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iin", kwlist, &bfd, &mfd, &npages))
        return -1;
    if (self->idx >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Mapping already initialised");
        return -1;
    }
    if (npages <= 0 || (size_t)npages > (SIZE_MAX / 2) / sd_page_size) {
        PyErr_Format(PyExc_ValueError, "npages must be > 0, got %zd", npages);
        return -1;
    }
    size_t len = (size_t)npages * sd_page_size;
    size_t state_len = ((size_t)npages + sd_page_size - 1) / sd_page_size * sd_page_size;
    struct stat st;
    if (fstat(bfd, &st) != 0) {
        raise_errno("fstat(backing_fd)");
        return -1;
    }
    if ((size_t)st.st_size < len) {
        PyErr_Format(PyExc_ValueError, "backing object holds %lld bytes, %zu needed",
                     (long long)st.st_size, len);
        return -1;
    }
    if (fstat(mfd, &st) != 0) {
        raise_errno("fstat(meta_fd)");
        return -1;
    }
    if ((size_t)st.st_size < state_len) {
        PyErr_Format(PyExc_ValueError, "metadata object holds %lld bytes, %zu needed",
                     (long long)st.st_size, state_len);
        return -1;
    }
    int fd = fcntl(bfd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) {
        raise_errno("dup");
        return -1;
    }
    void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        raise_errno("mmap(backing)");
        close(fd);
        return -1;
    }
    void *state = mmap(NULL, state_len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (state == MAP_FAILED) {
        raise_errno("mmap(meta)");
        munmap(base, len);
        close(fd);
        return -1;
    }
    int idx = sd_region_add(base, (size_t)npages, fd, state);
    if (idx < 0) {
        raise_errno("region table");
        munmap(state, state_len);
        munmap(base, len);
        close(fd);
        return -1;
    }
    self->idx = idx;
    self->base = base;
    self->npages = (size_t)npages;
    self->fd = fd;
    self->state = state;
    self->state_len = state_len;
    self->pid = getpid();
    return 0;
}

static PyObject *
Mapping_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    MappingObject *self = (MappingObject *)type->tp_alloc(type, 0);
    if (self) {
        self->idx = -1;
        self->fd = -1;
    }
    return (PyObject *)self;
}

static void
mapping_release(MappingObject *self)
{
    if (self->idx < 0)
        return;
    if (self->pid == getpid()) {
        sd_region_remove(self->idx);
        munmap(self->base, self->npages * sd_page_size);
        munmap(self->state, self->state_len);
    }
    /* In a forked child the table entry and the memory were dropped at fork
     * (sd_trap.c atfork_child): the addresses may hold something else now. */
    close(self->fd);
    self->idx = -1;
    self->fd = -1;
}

static void
Mapping_dealloc(MappingObject *self)
{
    mapping_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Mapping_close(MappingObject *self, PyObject *Py_UNUSED(ignored))
{
    /* In a forked child nothing is mapped any more (atfork_child) and the counts
     * are the parent's, inherited: only the fd is left to drop. */
    if (self->pid != getpid())
        goto release;
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close a region with %zd exported buffer(s): release memoryviews and arrays first",
                     self->exports);
        return NULL;
    }
    if (self->busy > 0) {
        PyErr_SetString(PyExc_BufferError, "cannot close a region while another thread merges or breaks it");
        return NULL;
    }
release:
    mapping_release(self);
    Py_RETURN_NONE;
}

static int
Mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags)
{
    if (mapping_check_open(self) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->base,
                          (Py_ssize_t)(self->npages * sd_page_size), 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
Mapping_releasebuffer(MappingObject *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static PyBufferProcs Mapping_as_buffer = {
    (getbufferproc)Mapping_getbuffer,
    (releasebufferproc)Mapping_releasebuffer,
};

typedef struct {
    PyObject_HEAD
    uint8_t *view;
    int fd;
    pid_t pid;
} StableViewObject;

static PyTypeObject StableViewType;

/* merge(view, items) -> bytes: items is a buffer of int64 triples
 * (first_page, npages, slot); slot -1 means the zero page.  The result has
 * one byte per page of the items, in order: 1 merged, 0 not. */
static PyObject *
Mapping_merge(MappingObject *self, PyObject *args)
{
    StableViewObject *sv;
    Py_buffer items;
    if (!PyArg_ParseTuple(args, "O!y*", &StableViewType, &sv, &items))
        return NULL;
    PyObject *result = NULL;
    if (mapping_check_open(self) < 0)
        goto out;
    if (sv->view == NULL) {
        PyErr_SetString(PyExc_ValueError, "stable view is closed");
        goto out;
    }
    if (items.len % 24 != 0) {
        PyErr_Format(PyExc_ValueError, "items must be int64 triples (first, npages, slot), got %zd bytes", items.len);
        goto out;
    }
    size_t nitems = (size_t)items.len / 24;
    const int64_t *it = items.buf;
    struct stat st;
    if (fstat(sv->fd, &st) != 0) {
        raise_errno("fstat(stable)");
        goto out;
    }
    int64_t stable_pages = (int64_t)((size_t)st.st_size / sd_page_size);
    size_t total = 0;
    for (size_t k = 0; k < nitems; k++) {
        int64_t first = it[3 * k], n = it[3 * k + 1], slot = it[3 * k + 2];
        if (first < 0 || n < 1 || (uint64_t)first + (uint64_t)n > self->npages) {
            PyErr_Format(PyExc_ValueError, "item %zu: pages [%lld, +%lld) outside the region of %zu pages",
                         k, (long long)first, (long long)n, self->npages);
            goto out;
        }
        if (slot < -1 || (slot >= 0 && (slot + n > stable_pages || slot + n > (int64_t)(STABLE_RESERVE / sd_page_size)))) {
            PyErr_Format(PyExc_ValueError, "item %zu: slots [%lld, +%lld) outside the stable object of %lld pages",
                         k, (long long)slot, (long long)n, (long long)stable_pages);
            goto out;
        }
        total += (size_t)n;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!result)
        goto out;
    uint8_t *res = (uint8_t *)PyBytes_AS_STRING(result);
    struct sd_region *r = sd_region_get(self->idx);
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    for (size_t k = 0; k < nitems; k++) {
        sd_merge_run(r, (size_t)it[3 * k], (size_t)it[3 * k + 1], sv->fd, sv->view, it[3 * k + 2], res);
        res += it[3 * k + 1];
    }
    Py_END_ALLOW_THREADS
    self->busy--;
out:
    PyBuffer_Release(&items);
    return result;
}

/* Pages broken per GIL release: between chunks break_range checks for
 * signals, so Ctrl-C interrupts a long unmerge within ~2 ms (256 pages at
 * ~8 us), while the cost of taking the GIL back stays negligible. */
#define BREAK_CHUNK 256

static PyObject *
Mapping_break_range(MappingObject *self, PyObject *args)
{
    Py_ssize_t first, n;
    if (!PyArg_ParseTuple(args, "nn", &first, &n))
        return NULL;
    if (mapping_check_open(self) < 0)
        return NULL;
    if (first < 0 || n < 0 || (size_t)first + (size_t)n > self->npages) {
        PyErr_Format(PyExc_ValueError, "pages [%zd, +%zd) outside the region of %zu pages", first, n, self->npages);
        return NULL;
    }
    struct sd_region *r = sd_region_get(self->idx);
    size_t i = (size_t)first, end = (size_t)first + (size_t)n;
    long broken = 0, got = 0;
    self->busy++;
    while (i < end) {
        size_t c = end - i < BREAK_CHUNK ? end - i : BREAK_CHUNK;
        Py_BEGIN_ALLOW_THREADS
        got = sd_break_range(r, i, c);
        Py_END_ALLOW_THREADS
        if (got < 0)
            break;
        broken += got;
        i += c;
        /* Every page is merged or private between chunks (sd_break_range's
         * contract), so an exception here (KeyboardInterrupt) leaves the
         * region consistent: what was broken stays private. */
        if (i < end && PyErr_CheckSignals() < 0) {
            self->busy--;
            return NULL;
        }
    }
    self->busy--;
    if (got < 0)
        return raise_errno("break_range");
    return PyLong_FromLong(broken);
}

static PyObject *
Mapping_states(MappingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_check_open(self) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)self->state, (Py_ssize_t)self->npages);
}

static PyObject *
Mapping_get_breaks(MappingObject *self, void *Py_UNUSED(closure))
{
    if (self->idx < 0 || self->pid != getpid())
        return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(atomic_load(&sd_region_get(self->idx)->breaks));
}

static PyObject *
Mapping_get_address(MappingObject *self, void *Py_UNUSED(closure))
{
    if (mapping_check_open(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->base);
}

static PyObject *
Mapping_get_closed(MappingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->idx < 0 || self->pid != getpid());
}

static PyObject *
Mapping_get_npages(MappingObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(self->npages);
}

static PyObject *
Mapping_get_exports(MappingObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->exports);
}

static PyMethodDef Mapping_methods[] = {
    {"close", (PyCFunction)Mapping_close, METH_NOARGS, "Unmap the region (BufferError while buffers are exported)."},
    {"merge", (PyCFunction)Mapping_merge, METH_VARARGS,
     "merge(stable_view, items) -> bytes: merge runs (int64 triples first, npages, slot; slot -1 = zero page)."},
    {"break_range", (PyCFunction)Mapping_break_range, METH_VARARGS,
     "break_range(first, npages) -> int: copy merged pages back to private ones; returns pages broken.\n"
     "Checks for signals every 256 pages; on an error or exception every page is merged or private."},
    {"states", (PyCFunction)Mapping_states, METH_NOARGS, "states() -> bytes: one state byte per page."},
    {NULL},
};

static PyGetSetDef Mapping_getset[] = {
    {"breaks", (getter)Mapping_get_breaks, NULL, "pages broken by the copy-on-write trap", NULL},
    {"address", (getter)Mapping_get_address, NULL, "address of the first page", NULL},
    {"closed", (getter)Mapping_get_closed, NULL, "True once closed (or in a forked child)", NULL},
    {"npages", (getter)Mapping_get_npages, NULL, "pages in the region", NULL},
    {"exports", (getter)Mapping_get_exports, NULL, "buffers currently exported", NULL},
    {NULL},
};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmdedup._native.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_dealloc = (destructor)Mapping_dealloc,
    .tp_as_buffer = &Mapping_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Mapping(backing_fd, meta_fd, npages): a region's memory and page states.",
    .tp_methods = Mapping_methods,
    .tp_getset = Mapping_getset,
    .tp_init = (initproc)Mapping_init,
    .tp_new = Mapping_new,
};

/* ---- StableView --------------------------------------------------------- */

static int
StableView_init(StableViewObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", NULL};
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &fd))
        return -1;
    if (self->view) {
        PyErr_SetString(PyExc_RuntimeError, "StableView already initialised");
        return -1;
    }
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (own < 0) {
        raise_errno("dup");
        return -1;
    }
    void *v = mmap(NULL, STABLE_RESERVE, PROT_READ, MAP_SHARED | MAP_NORESERVE, own, 0);
    if (v == MAP_FAILED) {
        raise_errno("mmap(stable)");
        close(own);
        return -1;
    }
    self->view = v;
    self->fd = own;
    self->pid = getpid();
    return 0;
}

static PyObject *
StableView_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    StableViewObject *self = (StableViewObject *)type->tp_alloc(type, 0);
    if (self)
        self->fd = -1;
    return (PyObject *)self;
}

static void
stableview_release(StableViewObject *self)
{
    if (self->view && self->pid == getpid())
        munmap(self->view, STABLE_RESERVE);
    if (self->fd >= 0)
        close(self->fd);
    self->view = NULL;
    self->fd = -1;
}

static void
StableView_dealloc(StableViewObject *self)
{
    stableview_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
StableView_close(StableViewObject *self, PyObject *Py_UNUSED(ignored))
{
    stableview_release(self);
    Py_RETURN_NONE;
}

static PyMethodDef StableView_methods[] = {
    {"close", (PyCFunction)StableView_close, METH_NOARGS, "Unmap the view and close its fd."},
    {NULL},
};

static PyTypeObject StableViewType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmdedup._native.StableView",
    .tp_basicsize = sizeof(StableViewObject),
    .tp_dealloc = (destructor)StableView_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "StableView(fd): read-only view of a stable object (fd should be read-only).",
    .tp_methods = StableView_methods,
    .tp_init = (initproc)StableView_init,
    .tp_new = StableView_new,
};

/* ---- functions ---------------------------------------------------------- */

static PyObject *
py_murmur3_128(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer b;
    PyObject *seed_obj = NULL;
    /* Not "I": that format masks, so -1 or 2**32 would silently hash with
     * another seed.  mmh3 (the oracle) raises ValueError; so do we. */
    if (!PyArg_ParseTuple(args, "y*|O", &b, &seed_obj))
        return NULL;
    uint32_t seed = 0;
    if (seed_obj) {
        PyObject *num = PyNumber_Index(seed_obj);   /* ints and numpy ints; TypeError otherwise */
        int overflow = 0;
        long long v = num ? PyLong_AsLongLongAndOverflow(num, &overflow) : -1;
        Py_XDECREF(num);
        if (!num || overflow || v < 0 || v > UINT32_MAX) {
            PyBuffer_Release(&b);
            if (num)
                PyErr_SetString(PyExc_ValueError, "seed is out of range (0 <= seed < 2**32)");
            return NULL;
        }
        seed = (uint32_t)v;
    }
    uint64_t h[2];
    Py_BEGIN_ALLOW_THREADS
    sd_murmur3_x64_128(b.buf, (size_t)b.len, seed, h);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return Py_BuildValue("(KK)", (unsigned long long)h[0], (unsigned long long)h[1]);
}

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
    for (size_t i = 0; i < n; i++) {
        if (ix[i] < 0) {
            PyErr_Format(PyExc_ValueError, "idx[%zu] = %lld is negative", i, (long long)ix[i]);
            goto done;
        }
        /* idx * page_size must fit off_t: a wrapped offset would read another page. */
        if ((uint64_t)ix[i] > (uint64_t)INT64_MAX / sd_page_size) {
            PyErr_Format(PyExc_ValueError, "idx[%zu] = %lld is past the largest file offset", i, (long long)ix[i]);
            goto done;
        }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sd_read_pages(fd, ix, n, sd_page_size, out.buf);
    if (rc == 0 && hashes.obj)
        sd_hash_pages(out.buf, n, sd_page_size, hashes.buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        raise_errno("pread");
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
 * buf equals page slots[i] of fd (both int64 buffers of the same length). */
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
        if (bi[i] < 0 || (size_t)bi[i] >= npages || sl[i] < 0) {
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
        raise_errno("pread(stable)");
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

static PyObject *
py_punch_hole(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd;
    long long off, len;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &off, &len))
        return NULL;
    if (off < 0 || len < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and length must be >= 0");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sd_punch(fd, (off_t)off, (off_t)len);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno("fallocate(PUNCH_HOLE)");
    Py_RETURN_NONE;
}

static PyObject *
py_resident_pages(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd;
    long long off, len;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &off, &len))
        return NULL;
    if (off < 0 || len < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and length must be >= 0");
        return NULL;
    }
    long n = sd_resident_pages(fd, (off_t)off, (size_t)len);
    if (n < 0)
        return raise_errno("cachestat");
    return PyLong_FromLong(n);
}

static PyObject *
py_trap_install(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    int rc = sd_trap_install();
    if (rc < 0)
        return raise_errno("sigaction(SIGSEGV)");
    return PyBool_FromLong(rc);
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

/* Test hook: while armed, every merge run gets its first byte changed in the
 * backing after write-protection and before the compare (a write that raced
 * the coordinator's compare).  The proof must then refuse the page. */
static void
hook_change_first_byte(struct sd_region *r, size_t first, size_t n)
{
    (void)n;
    uint8_t *addr = (uint8_t *)atomic_load(&r->base) + first * sd_page_size;
    uint8_t b = (uint8_t)(addr[0] ^ 0xff);
    ssize_t unused = pwrite(r->fd, &b, 1, (off_t)(first * sd_page_size));
    (void)unused;
}

static PyObject *
py_test_race_hook(PyObject *Py_UNUSED(m), PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p", &on))
        return NULL;
    sd_merge_test_hook = on ? hook_change_first_byte : NULL;
    Py_RETURN_NONE;
}

/* Test only: _test_arm_fault(point, countdown=0) arms one fault point (a
 * name from _FAULT_POINTS or its index; None, "none" or 0 disarms): the
 * process SIGKILLs itself the (countdown + 1)-th time it passes there. */
static PyObject *
py_test_arm_fault(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *point;
    long long countdown = 0;
    if (!PyArg_ParseTuple(args, "O|L", &point, &countdown))
        return NULL;
    long id = -1;
    if (point == Py_None) {
        id = SD_FAULT_NONE;
    } else if (PyUnicode_Check(point)) {
        const char *name = PyUnicode_AsUTF8(point);
        if (!name)
            return NULL;
        for (int i = 0; i < SD_FAULT_COUNT; i++)
            if (strcmp(name, sd_fault_names[i]) == 0)
                id = i;
        if (id < 0) {
            PyErr_Format(PyExc_ValueError, "unknown fault point %R (see _FAULT_POINTS)", point);
            return NULL;
        }
    } else if (PyLong_Check(point) && !PyBool_Check(point)) {
        id = PyLong_AsLong(point);
        if (id == -1 && PyErr_Occurred())
            PyErr_Clear();
        if (id < 0 || id >= SD_FAULT_COUNT) {
            PyErr_Format(PyExc_ValueError, "fault point %R is out of range (0 <= id < %d)",
                         point, SD_FAULT_COUNT);
            return NULL;
        }
    } else {
        PyErr_Format(PyExc_TypeError, "fault point must be a name or an int, not %.100s",
                     Py_TYPE(point)->tp_name);
        return NULL;
    }
    if (countdown < 0 || countdown > LONG_MAX) {
        PyErr_Format(PyExc_ValueError, "countdown must be >= 0, got %lld", countdown);
        return NULL;
    }
    sd_fault_arm((int)id, (long)countdown);
    Py_RETURN_NONE;
}

/* _fault_point(id): a fault point in Python code (the agent's); a no-op
 * unless a test armed that id. */
static PyObject *
py_fault_point(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long id = PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    if (id <= SD_FAULT_NONE || id >= SD_FAULT_COUNT) {
        PyErr_Format(PyExc_ValueError, "fault point %ld is out of range (1 <= id < %d)", id, SD_FAULT_COUNT);
        return NULL;
    }
    sd_fault_point((int)id);
    Py_RETURN_NONE;
}

static PyObject *
py_test_fail_mmaps(PyObject *Py_UNUSED(m), PyObject *args)
{
    int n;
    if (!PyArg_ParseTuple(args, "i", &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    atomic_store(&sd_test_fail_mmaps, n);
    Py_RETURN_NONE;
}

static PyObject *
py_test_segfault(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    /* A genuine segfault, for tests of chaining (like faulthandler._sigsegv). */
    volatile int *p = NULL;
    *p = 1;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"murmur3_128", py_murmur3_128, METH_VARARGS, "murmur3_128(data, seed=0) -> (h1, h2), as mmh3.hash64(signed=False)."},
    {"xxh64", py_xxh64, METH_VARARGS, "xxh64(data, seed=0) -> int, as xxhash.xxh64_intdigest."},
    {"hash_pages", py_hash_pages, METH_VARARGS, "hash_pages(buf) -> bytes: uint64 checksum (XXH64) of each page."},
    {"read_pages", py_read_pages, METH_VARARGS, "read_pages(fd, idx, out[, hashes]): pread pages (and checksum them)."},
    {"pages_equal", py_pages_equal, METH_VARARGS, "pages_equal(a, b) -> bool (memcmp)."},
    {"compare_slots", py_compare_slots, METH_VARARGS,
     "compare_slots(buf, buf_idx, fd, slots) -> bytes: page-by-page equality with slots of fd."},
    {"is_zero", py_is_zero, METH_VARARGS, "is_zero(buf) -> bool: all pages are zero."},
    {"punch_hole", py_punch_hole, METH_VARARGS, "punch_hole(fd, offset, length): fallocate PUNCH_HOLE|KEEP_SIZE."},
    {"resident_pages", py_resident_pages, METH_VARARGS,
     "resident_pages(fd, offset, length) -> pages of the range in memory (cachestat)."},
    {"trap_install", py_trap_install, METH_NOARGS, "Install the COW trap in front; True if it (re)installed."},
    {"trap_in_front", py_trap_in_front, METH_NOARGS, "True if the COW trap is the installed SIGSEGV handler."},
    {"merged_pages", py_merged_pages, METH_NOARGS, "Pages merged (MERGED or ZERO) in this process."},
    {"_test_race_hook", py_test_race_hook, METH_VARARGS, "Test only: change a run's first byte under protection."},
    {"_test_fail_mmaps", py_test_fail_mmaps, METH_VARARGS,
     "Test only: the next n copy-back mmaps of breaks fail with ENOMEM (as past vm.max_map_count)."},
    {"_test_segfault", py_test_segfault, METH_NOARGS, "Test only: a genuine segfault (NULL write)."},
    {"_test_arm_fault", py_test_arm_fault, METH_VARARGS,
     "Test only: _test_arm_fault(point, countdown=0): SIGKILL this process the (countdown+1)-th time it "
     "passes the fault point (a name of _FAULT_POINTS or its index; None disarms)."},
    {"_fault_point", py_fault_point, METH_O, "_fault_point(id): a fault point in Python code; no-op unless armed."},
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
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&StableViewType) < 0 ||
        PyType_Ready(&sd_HashIndexType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&MappingType);
    Py_INCREF(&StableViewType);
    Py_INCREF(&sd_HashIndexType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&MappingType) < 0 ||
        PyModule_AddObject(m, "StableView", (PyObject *)&StableViewType) < 0 ||
        PyModule_AddObject(m, "HashIndex", (PyObject *)&sd_HashIndexType) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", (long)sd_page_size) < 0 ||
        PyModule_AddIntConstant(m, "PRIVATE", SD_PRIVATE) < 0 ||
        PyModule_AddIntConstant(m, "MERGING", SD_MERGING) < 0 ||
        PyModule_AddIntConstant(m, "MERGED", SD_MERGED) < 0 ||
        PyModule_AddIntConstant(m, "BREAKING", SD_BREAKING) < 0 ||
        PyModule_AddIntConstant(m, "ZERO", SD_ZERO) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *names = PyTuple_New(SD_FAULT_COUNT);
    for (int i = 0; names && i < SD_FAULT_COUNT; i++) {
        PyObject *n = PyUnicode_FromString(sd_fault_names[i]);
        if (!n) {
            Py_CLEAR(names);
            break;
        }
        PyTuple_SET_ITEM(names, i, n);
    }
    if (!names || PyModule_AddObject(m, "_FAULT_POINTS", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
