/*
 * sllm native I/O engine.
 *
 * A pool of reader threads that serve fixed-size read requests into
 * caller-provided buffers, verify a CRC32C per request as the bytes land, and
 * report each completion through a queue so the consumer can use a chunk the
 * moment it is in memory (for example to start its host->device copy).
 *
 * Python surface (module sllm.native_loader._engine):
 *
 *   crc32c(data, value=0) -> int
 *       CRC32C (Castagnoli) of a bytes-like object, continuing from `value`.
 *       Uses the SSE4.2 instruction when the CPU has it.
 *
 *   Reader(paths, threads=8, direct=True)
 *       Opens every path (O_DIRECT where the filesystem allows it, a plain
 *       descriptor always, for requests that are not aligned or for
 *       filesystems such as tmpfs that refuse O_DIRECT).
 *     .submit(file, offset, length, dest, dest_offset, crc, tag)
 *       Queue a read of `length` bytes at `offset` of file #`file` into
 *       dest[dest_offset:dest_offset+length]; `crc` is the expected CRC32C or
 *       -1 for none. `dest` must be writable and stays referenced until the
 *       completion has been taken with next().
 *     .next(timeout=None) -> (tag, kind, errno, file, offset, got_crc) | None
 *       Wait for one completion. kind: 0 ok, 1 OS error (errno set),
 *       2 short read, 3 checksum mismatch, 4 cancelled. None on timeout.
 *     .cancel()    requests not yet started complete as cancelled.
 *     .close()     cancel, wait for the workers, release every buffer.
 *     .pending     requests submitted and not yet taken with next().
 *     .direct      tuple of bools: whether each file is read with O_DIRECT.
 *
 * The GIL is released while waiting and while workers read; workers never
 * touch Python objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define SLLM_HAVE_X86 1
#endif

/* ------------------------------------------------------------------ CRC32C */

static uint32_t crc_table[8][256];
static int crc_hw = 0;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#ifdef SLLM_HAVE_X86
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

static uint32_t crc_sw(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^
              crc_table[5][(w >> 16) & 0xff] ^ crc_table[4][(w >> 24) & 0xff] ^
              crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
              crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

#ifdef SLLM_HAVE_X86
__attribute__((target("sse4.2"))) static uint32_t crc_hw_x86(uint32_t crc, const unsigned char *p,
                                                             size_t n)
{
    uint64_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

static uint32_t crc32c(uint32_t crc, const void *data, size_t n)
{
#ifdef SLLM_HAVE_X86
    if (crc_hw)
        return crc_hw_x86(crc, (const unsigned char *)data, n);
#endif
    return crc_sw(crc, (const unsigned char *)data, n);
}

static PyObject *py_crc32c(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "value", NULL};
    Py_buffer view;
    unsigned long value = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|k", kwlist, &view, &value))
        return NULL;
    uint32_t out;
    if (view.len > (1 << 16)) {
        Py_BEGIN_ALLOW_THREADS
        out = crc32c((uint32_t)value, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        out = crc32c((uint32_t)value, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(out);
}

/* ------------------------------------------------------------------ Reader */

enum { K_OK = 0, K_OSERROR = 1, K_SHORT = 2, K_CHECKSUM = 3, K_CANCELLED = 4 };

typedef struct request {
    struct request *next;
    int file;
    int64_t offset;
    int64_t length;
    char *dest;
    Py_buffer view; /* keeps `dest` alive until next() hands the completion out */
    int64_t crc;    /* expected CRC32C, or -1 */
    PyObject *tag;
    /* result */
    int kind;
    int err;
    uint32_t got_crc;
} request;

typedef struct {
    request *head, *tail;
} rqueue;

static void rq_push(rqueue *q, request *r)
{
    r->next = NULL;
    if (q->tail)
        q->tail->next = r;
    else
        q->head = r;
    q->tail = r;
}

static request *rq_pop(rqueue *q)
{
    request *r = q->head;
    if (r) {
        q->head = r->next;
        if (!q->head)
            q->tail = NULL;
    }
    return r;
}

typedef struct {
    PyObject_HEAD
    int nfiles;
    int *fd_direct; /* -1 where O_DIRECT is not available */
    int *fd_plain;
    PyObject *paths; /* tuple of str */
    int nthreads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;
    pthread_cond_t done_cv;
    rqueue todo;
    rqueue done;
    Py_ssize_t pending;
    int cancelled;
    int stopping;
    int closed;
} Reader;

static int64_t read_fully(int fd, char *dst, int64_t len, int64_t off, int *err)
{
    int64_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, dst + got, (size_t)(len - got), (off_t)(off + got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return -1;
        }
        if (n == 0)
            break;
        got += n;
    }
    return got;
}

static void serve(Reader *rd, request *r)
{
    int aligned = ((uintptr_t)r->dest % 4096 == 0) && (r->offset % 4096 == 0) && (r->length % 512 == 0);
    int fd = (aligned && rd->fd_direct[r->file] >= 0) ? rd->fd_direct[r->file] : rd->fd_plain[r->file];
    int err = 0;
    int64_t got = read_fully(fd, r->dest, r->length, r->offset, &err);
    if (got < 0 && err == EINVAL && fd == rd->fd_direct[r->file]) {
        /* The filesystem accepted O_DIRECT at open but refuses the read. */
        err = 0;
        got = read_fully(rd->fd_plain[r->file], r->dest, r->length, r->offset, &err);
    }
    if (got < 0) {
        r->kind = K_OSERROR;
        r->err = err;
        return;
    }
    if (got < r->length) {
        r->kind = K_SHORT;
        r->err = 0;
        r->got_crc = (uint32_t)got; /* bytes actually read, reported to the caller */
        return;
    }
    if (r->crc >= 0) {
        r->got_crc = crc32c(0, r->dest, (size_t)r->length);
        if (r->got_crc != (uint32_t)r->crc) {
            r->kind = K_CHECKSUM;
            return;
        }
    }
    r->kind = K_OK;
}

static void *worker(void *arg)
{
    Reader *rd = (Reader *)arg;
    pthread_mutex_lock(&rd->mu);
    for (;;) {
        while (!rd->todo.head && !rd->stopping)
            pthread_cond_wait(&rd->work_cv, &rd->mu);
        request *r = rq_pop(&rd->todo);
        if (!r)
            break; /* stopping and nothing queued */
        int cancelled = rd->cancelled;
        pthread_mutex_unlock(&rd->mu);
        if (cancelled)
            r->kind = K_CANCELLED;
        else
            serve(rd, r);
        pthread_mutex_lock(&rd->mu);
        rq_push(&rd->done, r);
        pthread_cond_signal(&rd->done_cv);
    }
    pthread_mutex_unlock(&rd->mu);
    return NULL;
}

static void free_request(request *r)
{
    /* Needs the GIL. */
    PyBuffer_Release(&r->view);
    Py_XDECREF(r->tag);
    PyMem_RawFree(r);
}

static void reader_shutdown(Reader *rd)
{
    /* Needs the GIL; releases it while joining. */
    if (rd->closed)
        return;
    rd->closed = 1;
    if (rd->threads) {
        pthread_mutex_lock(&rd->mu);
        rd->cancelled = 1;
        rd->stopping = 1;
        pthread_cond_broadcast(&rd->work_cv);
        pthread_mutex_unlock(&rd->mu);
        Py_BEGIN_ALLOW_THREADS
        for (int i = 0; i < rd->nthreads; i++)
            pthread_join(rd->threads[i], NULL);
        Py_END_ALLOW_THREADS
        PyMem_RawFree(rd->threads);
        rd->threads = NULL;
    }
    request *r;
    while ((r = rq_pop(&rd->todo)))
        free_request(r);
    while ((r = rq_pop(&rd->done)))
        free_request(r);
    rd->pending = 0;
    for (int i = 0; i < rd->nfiles; i++) {
        if (rd->fd_direct && rd->fd_direct[i] >= 0)
            close(rd->fd_direct[i]);
        if (rd->fd_plain && rd->fd_plain[i] >= 0)
            close(rd->fd_plain[i]);
    }
    PyMem_RawFree(rd->fd_direct);
    PyMem_RawFree(rd->fd_plain);
    rd->fd_direct = rd->fd_plain = NULL;
    rd->nfiles = 0;
}

static void Reader_dealloc(Reader *rd)
{
    reader_shutdown(rd);
    pthread_mutex_destroy(&rd->mu);
    pthread_cond_destroy(&rd->work_cv);
    pthread_cond_destroy(&rd->done_cv);
    Py_XDECREF(rd->paths);
    Py_TYPE(rd)->tp_free((PyObject *)rd);
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Reader *rd = (Reader *)type->tp_alloc(type, 0);
    if (!rd)
        return NULL;
    pthread_mutex_init(&rd->mu, NULL);
    pthread_cond_init(&rd->work_cv, NULL);
    pthread_cond_init(&rd->done_cv, NULL);
    rd->closed = 1; /* until __init__ succeeds */
    return (PyObject *)rd;
}

static int Reader_init(Reader *rd, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"paths", "threads", "direct", NULL};
    PyObject *paths_in;
    int nthreads = 8, direct = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|ip", kwlist, &paths_in, &nthreads, &direct))
        return -1;
    if (!rd->closed || rd->paths) {
        PyErr_SetString(PyExc_RuntimeError, "Reader is already initialised");
        return -1;
    }
    if (nthreads < 1 || nthreads > 256) {
        PyErr_Format(PyExc_ValueError, "threads must be in 1..256, got %d", nthreads);
        return -1;
    }
    PyObject *paths = PySequence_Tuple(paths_in);
    if (!paths)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(paths);
    if (n < 1 || n > 65536) {
        Py_DECREF(paths);
        PyErr_SetString(PyExc_ValueError, "paths must name 1..65536 files");
        return -1;
    }
    rd->paths = paths;
    rd->fd_direct = PyMem_RawMalloc(sizeof(int) * (size_t)n);
    rd->fd_plain = PyMem_RawMalloc(sizeof(int) * (size_t)n);
    if (!rd->fd_direct || !rd->fd_plain) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        rd->fd_direct[i] = rd->fd_plain[i] = -1;
    rd->nfiles = (int)n;
    rd->closed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyTuple_GET_ITEM(paths, i);
        PyObject *enc = NULL;
        if (!PyUnicode_FSConverter(p, &enc))
            goto fail;
        const char *path = PyBytes_AS_STRING(enc);
        int fd;
        Py_BEGIN_ALLOW_THREADS
        fd = open(path, O_RDONLY | O_CLOEXEC);
        Py_END_ALLOW_THREADS
        if (fd < 0) {
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, p);
            Py_DECREF(enc);
            goto fail;
        }
        rd->fd_plain[i] = fd;
#ifdef O_DIRECT
        if (direct) {
            int dfd;
            Py_BEGIN_ALLOW_THREADS
            dfd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
            Py_END_ALLOW_THREADS
            rd->fd_direct[i] = dfd; /* -1 (EINVAL on tmpfs, ...) means plain reads */
        }
#endif
        Py_DECREF(enc);
    }
    rd->threads = PyMem_RawMalloc(sizeof(pthread_t) * (size_t)nthreads);
    if (!rd->threads) {
        PyErr_NoMemory();
        goto fail;
    }
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&rd->threads[i], NULL, worker, rd) != 0) {
            rd->nthreads = i;
            PyErr_SetString(PyExc_OSError, "could not start reader threads");
            goto fail;
        }
        rd->nthreads = i + 1;
    }
    return 0;
fail:
    reader_shutdown(rd);
    return -1;
}

static PyObject *Reader_submit(Reader *rd, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"file", "offset", "length", "dest", "dest_offset", "crc", "tag", NULL};
    int file;
    long long offset, length, dest_offset, crc;
    PyObject *tag;
    request *r = PyMem_RawCalloc(1, sizeof(request));
    if (!r)
        return PyErr_NoMemory();
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLLw*LLO", kwlist, &file, &offset, &length, &r->view,
                                     &dest_offset, &crc, &tag)) {
        PyMem_RawFree(r);
        return NULL;
    }
    const char *why = NULL;
    if (rd->closed)
        why = "Reader is closed";
    else if (file < 0 || file >= rd->nfiles)
        why = "file index out of range";
    else if (offset < 0 || length < 0 || dest_offset < 0)
        why = "offsets and lengths must be non-negative";
    else if (dest_offset > r->view.len || length > r->view.len - dest_offset)
        why = "destination buffer too small for the request";
    else if (crc < -1 || crc > 0xffffffffLL)
        why = "crc must be -1 or a 32-bit value";
    if (why) {
        PyBuffer_Release(&r->view);
        PyMem_RawFree(r);
        PyErr_SetString(PyExc_ValueError, why);
        return NULL;
    }
    r->file = file;
    r->offset = offset;
    r->length = length;
    r->dest = (char *)r->view.buf + dest_offset;
    r->crc = crc;
    Py_INCREF(tag);
    r->tag = tag;
    pthread_mutex_lock(&rd->mu);
    rq_push(&rd->todo, r);
    rd->pending++;
    pthread_cond_signal(&rd->work_cv);
    pthread_mutex_unlock(&rd->mu);
    Py_RETURN_NONE;
}

static PyObject *Reader_next(Reader *rd, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &timeout_obj))
        return NULL;
    double timeout = -1.0;
    if (timeout_obj != Py_None) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (timeout == -1.0 && PyErr_Occurred())
            return NULL;
        if (timeout < 0) {
            PyErr_SetString(PyExc_ValueError, "timeout must be >= 0");
            return NULL;
        }
    }
    if (rd->closed) {
        PyErr_SetString(PyExc_ValueError, "Reader is closed");
        return NULL;
    }
    request *r = NULL;
    int nothing = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec deadline;
    if (timeout >= 0) {
        clock_gettime(CLOCK_REALTIME, &deadline);
        double whole = (double)(long long)timeout;
        deadline.tv_sec += (time_t)whole;
        deadline.tv_nsec += (long)((timeout - whole) * 1e9);
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&rd->mu);
    for (;;) {
        r = rq_pop(&rd->done);
        if (r || rd->pending == 0)
            break;
        if (timeout >= 0) {
            if (pthread_cond_timedwait(&rd->done_cv, &rd->mu, &deadline) == ETIMEDOUT) {
                r = rq_pop(&rd->done);
                break;
            }
        } else {
            pthread_cond_wait(&rd->done_cv, &rd->mu);
        }
    }
    if (r)
        rd->pending--;
    else
        nothing = 1;
    pthread_mutex_unlock(&rd->mu);
    Py_END_ALLOW_THREADS
    if (nothing)
        Py_RETURN_NONE;
    PyObject *out = Py_BuildValue("(OiiiLk)", r->tag, r->kind, r->err, r->file, (long long)r->offset,
                                  (unsigned long)r->got_crc);
    free_request(r);
    return out;
}

static PyObject *Reader_cancel(Reader *rd, PyObject *unused)
{
    pthread_mutex_lock(&rd->mu);
    rd->cancelled = 1;
    pthread_mutex_unlock(&rd->mu);
    Py_RETURN_NONE;
}

static PyObject *Reader_close(Reader *rd, PyObject *unused)
{
    reader_shutdown(rd);
    Py_RETURN_NONE;
}

static PyObject *Reader_enter(Reader *rd, PyObject *unused)
{
    Py_INCREF(rd);
    return (PyObject *)rd;
}

static PyObject *Reader_exit(Reader *rd, PyObject *args)
{
    reader_shutdown(rd);
    Py_RETURN_FALSE;
}

static PyObject *Reader_get_pending(Reader *rd, void *closure)
{
    Py_ssize_t n;
    pthread_mutex_lock(&rd->mu);
    n = rd->pending;
    pthread_mutex_unlock(&rd->mu);
    return PyLong_FromSsize_t(n);
}

static PyObject *Reader_get_direct(Reader *rd, void *closure)
{
    PyObject *t = PyTuple_New(rd->nfiles);
    if (!t)
        return NULL;
    for (int i = 0; i < rd->nfiles; i++)
        PyTuple_SET_ITEM(t, i, PyBool_FromLong(rd->fd_direct[i] >= 0));
    return t;
}

static PyObject *Reader_get_paths(Reader *rd, void *closure)
{
    if (!rd->paths)
        return PyTuple_New(0);
    Py_INCREF(rd->paths);
    return rd->paths;
}

static PyMethodDef Reader_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Reader_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(file, offset, length, dest, dest_offset, crc, tag): queue one read"},
    {"next", (PyCFunction)(void (*)(void))Reader_next, METH_VARARGS | METH_KEYWORDS,
     "next(timeout=None): wait for one completion"},
    {"cancel", (PyCFunction)Reader_cancel, METH_NOARGS, "complete queued requests as cancelled"},
    {"close", (PyCFunction)Reader_close, METH_NOARGS, "stop the workers and release buffers"},
    {"__enter__", (PyCFunction)Reader_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Reader_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"pending", (getter)Reader_get_pending, NULL, "requests not yet taken with next()", NULL},
    {"direct", (getter)Reader_get_direct, NULL, "per file: read with O_DIRECT", NULL},
    {"paths", (getter)Reader_get_paths, NULL, "the files, in submit() index order", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sllm.native_loader._engine.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Thread pool of file readers with checksummed, chunked completions.",
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
    .tp_init = (initproc)Reader_init,
    .tp_new = Reader_new,
};

/* -------------------------------------------------------------- HostMemory */

/*
 * HostMemory(nbytes, hugepages=True): an anonymous, page-aligned mapping that
 * exposes the buffer protocol. `exports` counts live buffer views (a
 * memoryview of it, or a torch tensor made with torch.frombuffer over such a
 * memoryview, which keeps it for as long as its storage lives), so a pool
 * can tell whether anybody still reads this memory.
 * `on_release`, when set, is called with the address before the memory is
 * unmapped (used to undo cudaHostRegister).
 */
typedef struct {
    PyObject_HEAD
    char *data;
    Py_ssize_t nbytes;
    Py_ssize_t exports;
    PyObject *on_release;
    PyObject *weakrefs;
} HostMemory;

static void hostmem_unmap(HostMemory *hm)
{
    if (!hm->data)
        return;
    if (hm->on_release) {
        PyObject *res = PyObject_CallFunction(hm->on_release, "K", (unsigned long long)(uintptr_t)hm->data);
        if (!res)
            PyErr_WriteUnraisable(hm->on_release);
        Py_XDECREF(res);
        Py_CLEAR(hm->on_release);
    }
    munmap(hm->data, (size_t)hm->nbytes);
    hm->data = NULL;
}

static void HostMemory_dealloc(HostMemory *hm)
{
    if (hm->weakrefs)
        PyObject_ClearWeakRefs((PyObject *)hm);
    hostmem_unmap(hm);
    Py_TYPE(hm)->tp_free((PyObject *)hm);
}

static PyObject *HostMemory_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"nbytes", "hugepages", NULL};
    Py_ssize_t nbytes;
    int huge = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|p", kwlist, &nbytes, &huge))
        return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "nbytes must be >= 0");
        return NULL;
    }
    Py_ssize_t page = (Py_ssize_t)sysconf(_SC_PAGESIZE);
    Py_ssize_t size = nbytes == 0 ? page : (nbytes + page - 1) / page * page;
    void *p;
    Py_BEGIN_ALLOW_THREADS
    p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
#ifdef MADV_HUGEPAGE
    if (p != MAP_FAILED && huge)
        madvise(p, (size_t)size, MADV_HUGEPAGE);
#endif
    Py_END_ALLOW_THREADS
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_MemoryError);
    HostMemory *hm = (HostMemory *)type->tp_alloc(type, 0);
    if (!hm) {
        munmap(p, (size_t)size);
        return NULL;
    }
    hm->data = p;
    hm->nbytes = size;
    return (PyObject *)hm;
}

static int HostMemory_getbuffer(HostMemory *hm, Py_buffer *view, int flags)
{
    if (!hm->data) {
        PyErr_SetString(PyExc_ValueError, "HostMemory has been released");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)hm, hm->data, hm->nbytes, 0, flags) < 0)
        return -1;
    hm->exports++;
    return 0;
}

static void HostMemory_releasebuffer(HostMemory *hm, Py_buffer *view)
{
    hm->exports--;
}

static PyBufferProcs HostMemory_as_buffer = {
    (getbufferproc)HostMemory_getbuffer,
    (releasebufferproc)HostMemory_releasebuffer,
};

static PyObject *HostMemory_release(HostMemory *hm, PyObject *unused)
{
    if (hm->exports > 0) {
        PyErr_Format(PyExc_BufferError, "HostMemory still has %zd live views", hm->exports);
        return NULL;
    }
    hostmem_unmap(hm);
    Py_RETURN_NONE;
}

static PyObject *HostMemory_set_on_release(HostMemory *hm, PyObject *fn)
{
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "on_release must be callable or None");
        return NULL;
    }
    Py_XDECREF(hm->on_release);
    hm->on_release = fn == Py_None ? NULL : (Py_INCREF(fn), fn);
    Py_RETURN_NONE;
}

static PyObject *HostMemory_get_address(HostMemory *hm, void *c)
{
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)hm->data);
}

static PyObject *HostMemory_get_nbytes(HostMemory *hm, void *c)
{
    return PyLong_FromSsize_t(hm->data ? hm->nbytes : 0);
}

static PyObject *HostMemory_get_exports(HostMemory *hm, void *c)
{
    return PyLong_FromSsize_t(hm->exports);
}

static PyMethodDef HostMemory_methods[] = {
    {"release", (PyCFunction)HostMemory_release, METH_NOARGS, "unmap now (fails while views are alive)"},
    {"set_on_release", (PyCFunction)HostMemory_set_on_release, METH_O,
     "set_on_release(fn): fn(address) runs before the memory is unmapped"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef HostMemory_getset[] = {
    {"address", (getter)HostMemory_get_address, NULL, "address of the first byte", NULL},
    {"nbytes", (getter)HostMemory_get_nbytes, NULL, "mapped size (a whole number of pages)", NULL},
    {"exports", (getter)HostMemory_get_exports, NULL, "live buffer views", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject HostMemoryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sllm.native_loader._engine.HostMemory",
    .tp_basicsize = sizeof(HostMemory),
    .tp_dealloc = (destructor)HostMemory_dealloc,
    .tp_as_buffer = &HostMemory_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Page-aligned anonymous host memory with the buffer protocol.",
    .tp_methods = HostMemory_methods,
    .tp_getset = HostMemory_getset,
    .tp_weaklistoffset = offsetof(HostMemory, weakrefs),
    .tp_new = HostMemory_new,
};

static PyMethodDef module_methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_VARARGS | METH_KEYWORDS,
     "crc32c(data, value=0) -> int: CRC32C (Castagnoli) continuing from value"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "sllm.native_loader._engine",
    "Native I/O engine: threaded O_DIRECT chunk reads with CRC32C verification.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    crc_init();
    if (PyType_Ready(&ReaderType) < 0 || PyType_Ready(&HostMemoryType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (!m)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HostMemoryType);
    if (PyModule_AddObject(m, "HostMemory", (PyObject *)&HostMemoryType) < 0) {
        Py_DECREF(&HostMemoryType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "OK", K_OK);
    PyModule_AddIntConstant(m, "OSERROR", K_OSERROR);
    PyModule_AddIntConstant(m, "SHORT", K_SHORT);
    PyModule_AddIntConstant(m, "CHECKSUM", K_CHECKSUM);
    PyModule_AddIntConstant(m, "CANCELLED", K_CANCELLED);
    PyModule_AddIntConstant(m, "HW_CRC", crc_hw);
    return m;
}
