/* netstatd.sources.bpf._ringmerge: the records of every CPU's ring in one stream, in the order they
 * were made (ringbuf.py RingSet drives it).
 *
 * Each CPU has its ring (netstatd.bpf.c), so a socket's records can sit in different rings: a
 * connect() on one CPU, the handshake's softirq on another. A record's time is taken while its
 * transition holds the socket, so a socket's next record, on any CPU, has a later time: ordering by
 * time puts every socket's records in order.
 *
 * The rings are read one after the other, so a record made after the first was read could be read
 * from the second while an earlier record of the same socket is still to come from the first. The
 * watermark (the time before any ring was read) stops that: a record after it waits for the next
 * read. Every record up to it was committed before the rings were read, or was still being written
 * then, which no later record of its socket can pass.
 *
 *   merge(parts, watermark) -> (records, held)
 *     parts: each ring's records (the ring's 8-byte header, then the event), in ring order, each
 *     starting with what the previous call held for it. records: those with a time up to the
 *     watermark, by time (ring order among equal times, the first ring first); held: per ring, the
 *     records from its first one after the watermark on, to pass in again first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <linux/types.h>
#include <stddef.h>
#include <string.h>

#include "events.h"

#define HEADER 8
#define RECORD ((HEADER + sizeof(struct netstat_event) + 7) & ~7UL)
_Static_assert(RECORD == 152, "events.py's RECORD_SIZE");

struct entry {
	__u64 ts;
	const char *rec;
};

static __u64 ts_of(const char *rec)
{
	__u64 ts;

	memcpy(&ts, rec + HEADER + offsetof(struct netstat_event, ts_ns), sizeof(ts));
	return ts;
}

/* Stable sort of one ring's entries: nearly in order already (only a record whose program was
 * interrupted by another's is out of place), so an insertion sort is linear here. */
static void insertion_sort(struct entry *a, Py_ssize_t n)
{
	for (Py_ssize_t i = 1; i < n; i++) {
		struct entry x = a[i];
		Py_ssize_t j = i;

		while (j > 0 && a[j - 1].ts > x.ts) {
			a[j] = a[j - 1];
			j--;
		}
		a[j] = x;
	}
}

/* Merge sorted runs [starts[i], starts[i+1]) of a into one, pairwise (stable: the left run wins
 * ties); tmp is as large as a. Returns the array that holds the result. */
static struct entry *merge_runs(struct entry *a, struct entry *tmp, Py_ssize_t *starts, Py_ssize_t runs)
{
	while (runs > 1) {
		Py_ssize_t out = 0;

		for (Py_ssize_t r = 0; r < runs; r += 2) {
			Py_ssize_t lo = starts[r], mid = starts[r + 1], hi = r + 2 <= runs ? starts[r + 2] : mid;
			Py_ssize_t i = lo, j = mid, k = lo;

			while (i < mid && j < hi)
				tmp[k++] = a[j].ts < a[i].ts ? a[j++] : a[i++];
			while (i < mid)
				tmp[k++] = a[i++];
			while (j < hi)
				tmp[k++] = a[j++];
			starts[out++] = lo;
		}
		starts[out] = starts[runs];
		runs = out;
		struct entry *swap = a;
		a = tmp;
		tmp = swap;
	}
	return a;
}

static PyObject *merge(PyObject *self, PyObject *args)
{
	PyObject *parts, *seq, *records = NULL, *held = NULL, *result = NULL;
	unsigned long long watermark;
	struct entry *entries = NULL, *tmp = NULL;
	Py_ssize_t *starts = NULL, total = 0, runs = 0;

	if (!PyArg_ParseTuple(args, "OK", &parts, &watermark))
		return NULL;
	seq = PySequence_Fast(parts, "parts must be a sequence of bytes");
	if (!seq)
		return NULL;
	Py_ssize_t nparts = PySequence_Fast_GET_SIZE(seq);
	PyObject **items = PySequence_Fast_ITEMS(seq);

	for (Py_ssize_t p = 0; p < nparts; p++) {
		if (!PyBytes_Check(items[p]) || PyBytes_GET_SIZE(items[p]) % RECORD) {
			PyErr_SetString(PyExc_ValueError, "each part must be bytes of whole records");
			goto out;
		}
		total += PyBytes_GET_SIZE(items[p]) / RECORD;
	}
	held = PyList_New(nparts);
	entries = PyMem_Malloc((total + 1) * sizeof(*entries));
	tmp = PyMem_Malloc((total + 1) * sizeof(*tmp));
	starts = PyMem_Malloc((nparts + 2) * sizeof(*starts));
	if (!held || !entries || !tmp || !starts) {
		PyErr_NoMemory();
		goto out;
	}
	Py_ssize_t n = 0;

	for (Py_ssize_t p = 0; p < nparts; p++) {
		const char *data = PyBytes_AS_STRING(items[p]);
		Py_ssize_t count = PyBytes_GET_SIZE(items[p]) / RECORD, cut = 0;

		while (cut < count && ts_of(data + cut * RECORD) <= watermark)
			cut++;
		PyObject *rest = cut == 0 ? Py_NewRef(items[p])
					  : PyBytes_FromStringAndSize(data + cut * RECORD, (count - cut) * RECORD);
		if (!rest)
			goto out;
		PyList_SET_ITEM(held, p, rest);
		if (!cut)
			continue;
		starts[runs++] = n;
		for (Py_ssize_t i = 0; i < cut; i++, n++) {
			entries[n].rec = data + i * RECORD;
			entries[n].ts = ts_of(entries[n].rec);
		}
	}
	starts[runs] = n;
	records = PyBytes_FromStringAndSize(NULL, n * RECORD);
	if (!records)
		goto out;
	char *dst = PyBytes_AS_STRING(records);
	/* The parts are kept alive by seq, and nothing here touches a Python object. */
	Py_BEGIN_ALLOW_THREADS
	for (Py_ssize_t r = 0; r < runs; r++)
		insertion_sort(entries + starts[r], starts[r + 1] - starts[r]);
	struct entry *sorted = merge_runs(entries, tmp, starts, runs);
	for (Py_ssize_t i = 0; i < n; i++)
		memcpy(dst + i * RECORD, sorted[i].rec, RECORD);
	Py_END_ALLOW_THREADS
	result = PyTuple_Pack(2, records, held);
out:
	Py_XDECREF(records);
	Py_XDECREF(held);
	PyMem_Free(entries);
	PyMem_Free(tmp);
	PyMem_Free(starts);
	Py_DECREF(seq);
	return result;
}

static PyMethodDef methods[] = {
	{"merge", merge, METH_VARARGS,
	 "merge(parts, watermark) -> (records, held): every ring's records up to the watermark, by time; the "
	 "rest of each ring, to pass in again"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_ringmerge", "Every CPU's ring records in one stream, by time (see ringmerge.c)", -1,
	methods,
};

PyMODINIT_FUNC PyInit__ringmerge(void)
{
	return PyModule_Create(&module);
}
