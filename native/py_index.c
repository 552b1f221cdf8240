/* py_index.c - shmdedup._native.HashIndex and SlotIndex: sd_index and
 * sd_slotix for Python, in batches.
 *
 * Keys and values travel as uint64 / int64 buffers (numpy arrays), so one call
 * looks up or stores a whole batch with the GIL released. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "py_index.h"
#include "sd_index.h"

typedef struct {
    PyObject_HEAD
    struct sd_index ix;
    size_t min_buckets;     /* the capacity asked for: never shrunk below */
} HashIndexObject;

static int
HashIndex_init(HashIndexObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t cap = 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &cap))
        return -1;
    if (cap < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
        return -1;
    }
    sd_index_free(&self->ix);
    self->min_buckets = (size_t)cap * 2;
    if (sd_index_init(&self->ix, self->min_buckets) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
HashIndex_dealloc(HashIndexObject *self)
{
    sd_index_free(&self->ix);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
get_pair(PyObject *args, Py_buffer *keys, Py_buffer *vals, int writable_vals)
{
    if (!PyArg_ParseTuple(args, writable_vals ? "y*w*" : "y*y*", keys, vals))
        return -1;
    if (keys->len % 8 || vals->len != keys->len) {
        PyErr_SetString(PyExc_ValueError, "keys and values must be 8-byte buffers of the same length");
        PyBuffer_Release(keys);
        PyBuffer_Release(vals);
        return -1;
    }
    return 0;
}

/* get(keys, out): out[i] = value of keys[i] or -1. */
static PyObject *
HashIndex_get(HashIndexObject *self, PyObject *args)
{
    Py_buffer k, v;
    if (get_pair(args, &k, &v, 1) < 0)
        return NULL;
    size_t n = (size_t)k.len / 8;
    const uint64_t *keys = k.buf;
    int64_t *out = v.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++)
        out[i] = sd_index_get(&self->ix, keys[i]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* put(keys, vals): store each pair (later pairs win). */
static PyObject *
HashIndex_put(HashIndexObject *self, PyObject *args)
{
    Py_buffer k, v;
    if (get_pair(args, &k, &v, 0) < 0)
        return NULL;
    size_t n = (size_t)k.len / 8;
    const uint64_t *keys = k.buf;
    const int64_t *vals = v.buf;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++)
        if (vals[i] < 0) {
            PyErr_Format(PyExc_ValueError, "values must be >= 0, got %lld", (long long)vals[i]);
            rc = -2;
        }
    if (rc == 0) {
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n && rc == 0; i++)
            rc = sd_index_put(&self->ix, keys[i], vals[i]);
        Py_END_ALLOW_THREADS
        if (rc == -1)
            PyErr_NoMemory();
    }
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* delete(keys) -> number removed.  A table left under 1/8 full halves (not
 * below its initial capacity): deleting what merged gives the memory back. */
static PyObject *
HashIndex_delete(HashIndexObject *self, PyObject *args)
{
    Py_buffer k;
    if (!PyArg_ParseTuple(args, "y*", &k))
        return NULL;
    if (k.len % 8) {
        PyBuffer_Release(&k);
        PyErr_SetString(PyExc_ValueError, "keys must be a uint64 buffer");
        return NULL;
    }
    size_t n = (size_t)k.len / 8, removed = 0;
    const uint64_t *keys = k.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++)
        removed += (size_t)sd_index_del(&self->ix, keys[i]);
    if (removed)
        (void)sd_index_fit(&self->ix, self->min_buckets);   /* ENOMEM: stays as it is */
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&k);
    return PyLong_FromSize_t(removed);
}

static PyObject *
HashIndex_clear(HashIndexObject *self, PyObject *Py_UNUSED(ignored))
{
    /* Emptied, and sized for what it held: a table whose entries mostly left
     * (their pages merged) goes back to its initial capacity, one still well
     * used (unique pages, found again next full scan) keeps its size rather
     * than regrowing from small every time (ENOMEM: emptied in place). */
    size_t held = self->ix.count, cap = self->min_buckets;
    while (cap * 3 < (held + 1) * 4)
        cap <<= 1;
    if (cap >= self->ix.mask + 1)
        sd_index_clear(&self->ix);
    else
        (void)sd_index_reset(&self->ix, cap);
    Py_RETURN_NONE;
}

static Py_ssize_t
HashIndex_len(HashIndexObject *self)
{
    return (Py_ssize_t)self->ix.count;
}

static PyObject *
HashIndex_nbytes(HashIndexObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t((self->ix.mask + 1) * 16);
}

static PyMethodDef HashIndex_methods[] = {
    {"get", (PyCFunction)HashIndex_get, METH_VARARGS, "get(keys, out): out[i] = value or -1."},
    {"put", (PyCFunction)HashIndex_put, METH_VARARGS, "put(keys, values): store pairs."},
    {"delete", (PyCFunction)HashIndex_delete, METH_VARARGS, "delete(keys) -> removed count."},
    {"clear", (PyCFunction)HashIndex_clear, METH_NOARGS, "Remove everything; the table sized for what it held."},
    {NULL},
};

static PyGetSetDef HashIndex_getset[] = {
    {"nbytes", (getter)HashIndex_nbytes, NULL, "bytes the table holds (16 a bucket)", NULL},
    {NULL},
};

static PySequenceMethods HashIndex_as_sequence = {
    .sq_length = (lenfunc)HashIndex_len,
};

PyTypeObject sd_HashIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmdedup._native.HashIndex",
    .tp_basicsize = sizeof(HashIndexObject),
    .tp_dealloc = (destructor)HashIndex_dealloc,
    .tp_as_sequence = &HashIndex_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "HashIndex(capacity=1024): uint64 checksum -> int64 value, batch operations.",
    .tp_methods = HashIndex_methods,
    .tp_getset = HashIndex_getset,
    .tp_init = (initproc)HashIndex_init,
    .tp_new = PyType_GenericNew,
};

/* ---- SlotIndex: sd_slotix for Python (the stable index) ----
 *
 * Every call takes the caller's per-slot checksum array (uint64, slot_hash
 * [slot] = the slot's checksum), which must cover every slot stored so far:
 * checked, so a short array is a ValueError, never a read out of bounds. */

typedef struct {
    PyObject_HEAD
    struct sd_slotix ix;
    size_t min_buckets;
    size_t limit;           /* 1 + the highest slot ever stored */
} SlotIndexObject;

static int
SlotIndex_init(SlotIndexObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t cap = 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &cap))
        return -1;
    if (cap < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
        return -1;
    }
    sd_slotix_free(&self->ix);
    self->min_buckets = (size_t)cap * 2;
    self->limit = 0;
    if (sd_slotix_init(&self->ix, self->min_buckets) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
SlotIndex_dealloc(SlotIndexObject *self)
{
    sd_slotix_free(&self->ix);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The keys array: 8-byte items covering every slot stored. */
static int
check_slot_keys(SlotIndexObject *self, Py_buffer *sk)
{
    if (sk->len % 8 || (size_t)sk->len / 8 < self->limit) {
        PyErr_Format(PyExc_ValueError, "slot_hash must be a uint64 buffer of at least %zu items",
                     self->limit);
        return -1;
    }
    return 0;
}

/* get(keys, out, slot_hash): out[i] = slot of keys[i] or -1. */
static PyObject *
SlotIndex_get(SlotIndexObject *self, PyObject *args)
{
    Py_buffer k, v, sk;
    if (!PyArg_ParseTuple(args, "y*w*y*", &k, &v, &sk))
        return NULL;
    PyObject *ret = NULL;
    if (k.len % 8 || v.len != k.len) {
        PyErr_SetString(PyExc_ValueError, "keys and out must be 8-byte buffers of the same length");
        goto out;
    }
    if (check_slot_keys(self, &sk) < 0)
        goto out;
    size_t n = (size_t)k.len / 8;
    const uint64_t *keys = k.buf, *slot_keys = sk.buf;
    int64_t *res = v.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++)
        res[i] = sd_slotix_get(&self->ix, slot_keys, keys[i]);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&sk);
    return ret;
}

/* put(keys, slots, slot_hash): store each pair (later pairs win);
 * slot_hash[slots[i]] must be keys[i]. */
static PyObject *
SlotIndex_put(SlotIndexObject *self, PyObject *args)
{
    Py_buffer k, v, sk;
    if (!PyArg_ParseTuple(args, "y*y*y*", &k, &v, &sk))
        return NULL;
    PyObject *ret = NULL;
    if (k.len % 8 || v.len != k.len || sk.len % 8) {
        PyErr_SetString(PyExc_ValueError, "keys, slots and slot_hash must be 8-byte buffers "
                        "(keys and slots of the same length)");
        goto out;
    }
    size_t n = (size_t)k.len / 8, nsk = (size_t)sk.len / 8, top = self->limit;
    const uint64_t *keys = k.buf, *slot_keys = sk.buf;
    const int64_t *slots = v.buf;
    if (check_slot_keys(self, &sk) < 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        if (slots[i] < 0 || (uint64_t)slots[i] >= nsk || slots[i] >= (int64_t)UINT32_MAX - 1) {
            PyErr_Format(PyExc_ValueError, "slot %lld out of range (slot_hash has %zu items)",
                         (long long)slots[i], nsk);
            goto out;
        }
        if (slot_keys[slots[i]] != keys[i]) {
            PyErr_Format(PyExc_ValueError, "slot_hash[%lld] is not the key stored for it",
                         (long long)slots[i]);
            goto out;
        }
        if ((size_t)slots[i] + 1 > top)
            top = (size_t)slots[i] + 1;
    }
    self->limit = top;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = sd_slotix_put(&self->ix, slot_keys, keys[i], slots[i]);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto out;
    }
    ret = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&sk);
    return ret;
}

/* delete(keys, slot_hash) -> number removed; halves under 1/8 full. */
static PyObject *
SlotIndex_delete(SlotIndexObject *self, PyObject *args)
{
    Py_buffer k, sk;
    if (!PyArg_ParseTuple(args, "y*y*", &k, &sk))
        return NULL;
    PyObject *ret = NULL;
    if (k.len % 8) {
        PyErr_SetString(PyExc_ValueError, "keys must be a uint64 buffer");
        goto out;
    }
    if (check_slot_keys(self, &sk) < 0)
        goto out;
    size_t n = (size_t)k.len / 8, removed = 0;
    const uint64_t *keys = k.buf, *slot_keys = sk.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++)
        removed += (size_t)sd_slotix_del(&self->ix, slot_keys, keys[i]);
    if (removed)
        (void)sd_slotix_fit(&self->ix, slot_keys, self->min_buckets);
    Py_END_ALLOW_THREADS
    ret = PyLong_FromSize_t(removed);
out:
    PyBuffer_Release(&k);
    PyBuffer_Release(&sk);
    return ret;
}

static PyObject *
SlotIndex_clear(SlotIndexObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)sd_slotix_reset(&self->ix, self->min_buckets);
    Py_RETURN_NONE;
}

static Py_ssize_t
SlotIndex_len(SlotIndexObject *self)
{
    return (Py_ssize_t)self->ix.count;
}

static PyObject *
SlotIndex_nbytes(SlotIndexObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t((self->ix.mask + 1) * sizeof *self->ix.b);
}

static PyMethodDef SlotIndex_methods[] = {
    {"get", (PyCFunction)SlotIndex_get, METH_VARARGS, "get(keys, out, slot_hash): out[i] = slot or -1."},
    {"put", (PyCFunction)SlotIndex_put, METH_VARARGS, "put(keys, slots, slot_hash): store pairs."},
    {"delete", (PyCFunction)SlotIndex_delete, METH_VARARGS, "delete(keys, slot_hash) -> removed count."},
    {"clear", (PyCFunction)SlotIndex_clear, METH_NOARGS, "Remove everything; back to the initial capacity."},
    {NULL},
};

static PyGetSetDef SlotIndex_getset[] = {
    {"nbytes", (getter)SlotIndex_nbytes, NULL, "bytes the table holds (8 a bucket)", NULL},
    {NULL},
};

static PySequenceMethods SlotIndex_as_sequence = {
    .sq_length = (lenfunc)SlotIndex_len,
};

PyTypeObject sd_SlotIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmdedup._native.SlotIndex",
    .tp_basicsize = sizeof(SlotIndexObject),
    .tp_dealloc = (destructor)SlotIndex_dealloc,
    .tp_as_sequence = &SlotIndex_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SlotIndex(capacity=1024): uint64 checksum -> stable slot, the checksums kept by the "
              "caller (slot_hash[slot]), 8 bytes a bucket; batch operations.",
    .tp_methods = SlotIndex_methods,
    .tp_getset = SlotIndex_getset,
    .tp_init = (initproc)SlotIndex_init,
    .tp_new = PyType_GenericNew,
};
