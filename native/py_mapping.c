/* py_mapping.c - the Mapping and StableView types of shmdedup._native.
 *
 *   Mapping     a region's memory: the backing mapped MAP_SHARED read-write plus
 *               its state bytes, registered with the trap; exports a writable
 *               buffer; merge() and break_range() act on it (GIL released).
 *   StableView  a worker's read-only view of the coordinator's stable object,
 *               the other side of every merge proof.
 *
 * Regions are not inherited across fork: every method checks the pid, and a
 * forked child's objects only drop their descriptors (sd_trap.c unmapped the
 * memory in the child).
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
#include "py_mapping.h"
#include "sd_merge.h"
#include "sd_pages.h"
#include "sd_trap.h"
#include "sd_view.h"

/* Address space a StableView reserves: the stable object may grow up to this
 * without remapping (it is virtual: nothing is committed). */
#define STABLE_RESERVE ((size_t)1 << 38)

/* ---- Mapping ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int idx;            /* region table slot; -1 once closed */
    uint8_t *base;
    size_t npages;
    int fd;             /* dup of the backing fd: same open file, so remaps coalesce */
    uint8_t *state;
    size_t state_len;
    uint64_t *ref;      /* per page stable references (sd_region.h), private */
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
        sd_raise_errno("fstat(backing_fd)");
        return -1;
    }
    if ((size_t)st.st_size < len) {
        PyErr_Format(PyExc_ValueError, "backing object holds %lld bytes, %zu needed",
                     (long long)st.st_size, len);
        return -1;
    }
    if (fstat(mfd, &st) != 0) {
        sd_raise_errno("fstat(meta_fd)");
        return -1;
    }
    if ((size_t)st.st_size < state_len) {
        PyErr_Format(PyExc_ValueError, "metadata object holds %lld bytes, %zu needed",
                     (long long)st.st_size, state_len);
        return -1;
    }
    int fd = fcntl(bfd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) {
        sd_raise_errno("dup");
        return -1;
    }
    void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        sd_raise_errno("mmap(backing)");
        close(fd);
        return -1;
    }
    void *state = mmap(NULL, state_len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (state == MAP_FAILED) {
        sd_raise_errno("mmap(meta)");
        munmap(base, len);
        close(fd);
        return -1;
    }
    /* Zeroed lazily by the kernel (calloc of this size maps fresh memory):
     * only pages that ever merge cost their 8 bytes. */
    uint64_t *ref = calloc((size_t)npages, sizeof *ref);
    if (!ref) {
        PyErr_NoMemory();
        munmap(state, state_len);
        munmap(base, len);
        close(fd);
        return -1;
    }
    int idx = sd_region_add(base, (size_t)npages, fd, state, ref);
    if (idx < 0) {
        sd_raise_errno("region table");
        free(ref);
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
    self->ref = ref;
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
    free(self->ref);
    self->ref = NULL;
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
    uint32_t tag;       /* in the table of views breaks copy from (sd_view.h); 0: none */
    pid_t pid;
} StableViewObject;


/* merge(view, items) -> bytes: items is a buffer of int64 triples
 * (first_page, npages, slot); slot -1 means the zero page.  The result has
 * one byte per page of the items, in order: 1 merged, 0 not. */
static PyObject *
Mapping_merge(MappingObject *self, PyObject *args)
{
    StableViewObject *sv;
    Py_buffer items;
    if (!PyArg_ParseTuple(args, "O!y*", &sd_StableViewType, &sv, &items))
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
        sd_raise_errno("fstat(stable)");
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
        sd_merge_run(r, (size_t)it[3 * k], (size_t)it[3 * k + 1], sv->fd, sv->view, sv->tag,
                     it[3 * k + 2], res);
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
        got = sd_break_cow(r, i, c);
        Py_END_ALLOW_THREADS
        if (got < 0)
            break;
        broken += got;
        i += c;
        /* Every page is merged or private between chunks (sd_break_cow's
         * contract), so an exception here (KeyboardInterrupt) leaves the
         * region consistent: what was broken stays private. */
        if (i < end && PyErr_CheckSignals() < 0) {
            self->busy--;
            return NULL;
        }
    }
    self->busy--;
    if (got < 0)
        return sd_raise_errno("break_range");
    return PyLong_FromLong(broken);
}

/* checksums(first, n) -> bytes: sd_merge_hints, 8 bytes (uint64, native
 * order) a page. */
static PyObject *
Mapping_checksums(MappingObject *self, PyObject *args)
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
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (!out || n == 0)
        return out;
    uint64_t *h = (uint64_t *)PyBytes_AS_STRING(out);
    long got;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    got = sd_merge_hints(sd_region_get(self->idx), (size_t)first, (size_t)n, h);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (got < 0) {
        Py_DECREF(out);
        return sd_raise_errno("mincore");
    }
    return out;
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
    {"checksums", (PyCFunction)Mapping_checksums, METH_VARARGS,
     "checksums(first, npages) -> bytes: XXH64 (uint64) of each private page with data, 0 for others (holes are not read)."},
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

PyTypeObject sd_MappingType = {
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
        sd_raise_errno("dup");
        return -1;
    }
    void *v = mmap(NULL, STABLE_RESERVE, PROT_READ, MAP_SHARED | MAP_NORESERVE, own, 0);
    if (v == MAP_FAILED) {
        sd_raise_errno("mmap(stable)");
        close(own);
        return -1;
    }
    self->view = v;
    self->fd = own;
    self->tag = sd_view_add(v, STABLE_RESERVE);
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
    if (self->view && self->pid == getpid()) {
        /* Pages merged through this view may stay mapped (a coordinator
         * restart): their breaks copy from their own mapping from now on. */
        sd_view_remove(self->tag);
        munmap(self->view, STABLE_RESERVE);
    }
    self->tag = 0;
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

PyTypeObject sd_StableViewType = {
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

