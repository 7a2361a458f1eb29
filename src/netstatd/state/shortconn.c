/* netstatd.state._shortconn: the native path for short TCP connections (state/native.py drives it).
 *
 * Under churn most connections open and close within one flush period (50 ms). The fold costs a
 * few microseconds per side of such a connection in Python (tuples per record, a dict entry, a
 * Conn, an event); this module does that work in C, given plain data, with no call into Python:
 *
 *   split()    takes a chunk of ring records and sorts the records of TCP connections whose cookie is
 *              not known (pending, live or reconciled: the containers it is given) by cookie. Those
 *              whose latest state is CLOSE come back packed (struct short_conn); those still open come
 *              back as records to carry into the next chunk, which is passed in again before it (and
 *              folded at the flush). The other records come back in order, for the Python fold.
 *   distinct() gives the packed connections' distinct template keys (what their event text depends
 *              on besides timestamp, ports and cookie), one representative connection each.
 *   render()   writes each connection's connection.event from its key's template, made once per flush
 *              by the one event builder (enrich/events.py) from the representative: only timestamp,
 *              ports and cookie are written here.
 *
 * tests/unit/test_shortconn.py checks that a tracker with this module and one without give the same
 * events and metrics.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <linux/types.h>
#include <string.h>
#include <time.h>

#include "../sources/bpf/events.h"

/* The kernel's TCP state numbers, as protocol.py names them (TCP_SYN_SENT, TCP_CLOSE, TCP_LISTEN). */
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define MAX_STATES 32 /* more than any real connection passes through; longer ones take the Python path */

/* A ring buffer record as the chunk holds it: the ring's 8-byte header, then the event. */
struct record {
	__u32 len;
	__u32 page_off;
	struct netstat_event e;
};
_Static_assert(sizeof(struct record) == 152, "events.py's RECORD_SIZE");

/* One short connection, packed by split() for render(). */
struct short_conn {
	struct record last;  /* its latest state record: addresses, ports, timestamp */
	struct record owner; /* its accept record if any, else `last` */
	__u8 first_old;      /* old state of its first record (0 when that was the accept) */
	__u8 accepted;
	__u8 nstates;
	__u8 _pad[5];
	__u8 states[MAX_STATES]; /* every state it passed through, in order */
};

enum { REST = -1, CARRY = -2 };

struct group {
	__u64 cookie;
	Py_ssize_t last_state; /* index of its latest state record, -1 before one */
	Py_ssize_t accept;     /* index of its latest accept record, -1 without */
	Py_ssize_t records;
	Py_ssize_t slot; /* index in the packed output; REST or CARRY when not packed */
	unsigned nstates;
	__u8 first_old;
};

static unsigned folded_count(__u64 folded)
{
	unsigned n = 0;
	for (; folded; folded >>= FOLDED_BITS)
		n++;
	return n;
}

static const struct record *record_at(const char *chunk, Py_ssize_t i)
{
	return (const struct record *)(chunk + i * (Py_ssize_t)sizeof(struct record));
}

/* Open addressing, cookie -> group index; the table is at least twice the records. */
static Py_ssize_t *find_slot(Py_ssize_t *table, size_t mask, const struct group *groups, __u64 cookie)
{
	size_t h = (size_t)(cookie * 0x9E3779B97F4A7C15ull) & mask;
	while (table[h] >= 0 && groups[table[h]].cookie != cookie)
		h = (h + 1) & mask;
	return &table[h];
}

/* 1 when cookie is in any of the containers of `known` (a tuple), 0 when in none, -1 on error. */
static int is_known(__u64 cookie, PyObject *known)
{
	PyObject *key = PyLong_FromUnsignedLongLong(cookie);
	if (!key)
		return -1;
	int found = 0;
	for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(known) && !found; d++)
		found = PySequence_Contains(PyTuple_GET_ITEM(known, d), key);
	Py_DECREF(key);
	return found;
}

/* The owners split() reports: (pid, comm) once per process within a short look back. */
struct owners {
	__u32 *pids;
	Py_ssize_t count;
	PyObject *list;
};

static int add_owner(struct owners *o, const struct record *r)
{
	__u32 pid = r->e.tgid;
	if (!pid)
		return 0;
	for (Py_ssize_t p = o->count - 1; p >= 0 && p >= o->count - 8; p--)
		if (o->pids[p] == pid)
			return 0; /* a chunk's owners repeat in runs */
	o->pids[o->count++] = pid;
	PyObject *owner = Py_BuildValue("(Iy#)", pid, r->e.comm, (Py_ssize_t)NETSTATD_COMM_LEN);
	int failed = !owner || PyList_Append(o->list, owner) < 0;
	Py_XDECREF(owner);
	return failed ? -1 : 0;
}

static PyObject *split(PyObject *self, PyObject *args)
{
	Py_buffer chunk;
	PyObject *known;
	if (!PyArg_ParseTuple(args, "y*O!:split", &chunk, &PyTuple_Type, &known))
		return NULL;
	PyObject *result = NULL, *rest = NULL, *carry = NULL, *packed = NULL, *owners = NULL;
	const char *data = chunk.buf;
	Py_ssize_t n = chunk.len / (Py_ssize_t)sizeof(struct record);
	size_t cap = 16;
	while (cap < 2 * (size_t)n)
		cap <<= 1;
	struct group *groups = PyMem_Malloc((n ? n : 1) * sizeof(*groups));
	Py_ssize_t *group_of = PyMem_Malloc((n ? n : 1) * sizeof(*group_of));
	Py_ssize_t *table = PyMem_Malloc(cap * sizeof(*table));
	struct owners seen = {.pids = PyMem_Malloc((2 * n + 1) * sizeof(__u32))};
	if (chunk.len % (Py_ssize_t)sizeof(struct record)) {
		PyErr_Format(PyExc_ValueError, "chunk of %zd bytes is not whole records", chunk.len);
		goto out;
	}
	if (!groups || !group_of || !table || !seen.pids) {
		PyErr_NoMemory();
		goto out;
	}
	memset(table, 0xff, cap * sizeof(*table));

	/* Group the records of TCP connections by cookie, in order of first appearance. */
	Py_ssize_t ngroups = 0;
	for (Py_ssize_t i = 0; i < n; i++) {
		const struct netstat_event *e = &record_at(data, i)->e;
		int state = e->kind == EV_TCP_STATE && !(e->oldstate == TCP_LISTEN && e->newstate == TCP_CLOSE);
		if (!state && e->kind != EV_TCP_ACCEPT) {
			group_of[i] = -1;
			continue;
		}
		Py_ssize_t *slot = find_slot(table, cap - 1, groups, e->cookie);
		if (*slot < 0) {
			struct group *g = &groups[ngroups];
			g->cookie = e->cookie;
			g->last_state = g->accept = -1;
			g->slot = REST;
			g->records = 0;
			g->nstates = 0;
			g->first_old = state ? e->oldstate : 0; /* as Tracker.ingest's pending entry has it */
			*slot = ngroups++;
		}
		struct group *g = &groups[*slot];
		group_of[i] = *slot;
		g->records++;
		if (state) {
			g->last_state = i;
			g->nstates += folded_count(e->folded) + 1;
		} else {
			g->accept = i;
		}
	}

	/* Of the connections the tracker has nothing on: short when the latest state is CLOSE, carried
	 * while still open. */
	Py_ssize_t nshort = 0, packed_records = 0, carried = 0;
	for (Py_ssize_t gi = 0; gi < ngroups; gi++) {
		struct group *g = &groups[gi];
		if (g->nstates > MAX_STATES)
			continue;
		int k = is_known(g->cookie, known);
		if (k < 0)
			goto out;
		if (k)
			continue;
		if (g->last_state >= 0 && record_at(data, g->last_state)->e.newstate == TCP_CLOSE) {
			g->slot = nshort++;
			packed_records += g->records;
		} else {
			g->slot = CARRY;
			carried += g->records;
		}
	}

	rest = PyBytes_FromStringAndSize(NULL, (n - packed_records - carried) * (Py_ssize_t)sizeof(struct record));
	carry = PyBytes_FromStringAndSize(NULL, carried * (Py_ssize_t)sizeof(struct record));
	packed = PyBytes_FromStringAndSize(NULL, nshort * (Py_ssize_t)sizeof(struct short_conn));
	seen.list = owners = PyList_New(0);
	if (!rest || !carry || !packed || !owners)
		goto out;
	char *rest_out = PyBytes_AS_STRING(rest), *carry_out = PyBytes_AS_STRING(carry);
	struct short_conn *conns = (struct short_conn *)PyBytes_AS_STRING(packed);
	memset(conns, 0, nshort * sizeof(*conns));
	for (Py_ssize_t i = 0; i < n; i++) {
		const struct record *r = record_at(data, i);
		Py_ssize_t gi = group_of[i];
		if (gi < 0 || groups[gi].slot == REST) {
			memcpy(rest_out, r, sizeof(*r));
			rest_out += sizeof(*r);
			continue;
		}
		if (groups[gi].slot == CARRY) {
			memcpy(carry_out, r, sizeof(*r));
			carry_out += sizeof(*r);
			continue;
		}
		struct group *g = &groups[gi];
		struct short_conn *c = &conns[g->slot];
		if (i == g->accept) {
			c->owner = *r;
			c->accepted = 1;
		} else if (r->e.kind == EV_TCP_STATE) {
			for (__u64 f = r->e.folded; f; f >>= FOLDED_BITS)
				c->states[c->nstates++] = f & ((1u << FOLDED_BITS) - 1);
			c->states[c->nstates++] = r->e.newstate;
			if (i == g->last_state)
				c->last = *r;
		}
	}

	/* Their owners, once per process: the tracker reads /proc/PID/exe while the process lives. */
	for (Py_ssize_t gi = 0; gi < ngroups; gi++) {
		struct group *g = &groups[gi];
		if (g->slot == CARRY) {
			if ((g->accept >= 0 && add_owner(&seen, record_at(data, g->accept)) < 0) ||
			    (g->last_state >= 0 && add_owner(&seen, record_at(data, g->last_state)) < 0))
				goto out;
		}
		if (g->slot < 0)
			continue;
		struct short_conn *c = &conns[g->slot];
		c->first_old = g->first_old;
		if (!c->accepted)
			c->owner = c->last;
		if (add_owner(&seen, &c->owner) < 0)
			goto out;
	}
	result = PyTuple_Pack(4, rest, packed, owners, carry);
out:
	Py_XDECREF(rest);
	Py_XDECREF(carry);
	Py_XDECREF(packed);
	Py_XDECREF(owners);
	PyMem_Free(seen.pids);
	PyMem_Free(groups);
	PyMem_Free(group_of);
	PyMem_Free(table);
	PyBuffer_Release(&chunk);
	return result;
}

/* The template key of a short connection: what its event text depends on besides timestamp, ports,
 * cookie and counters. Its local port only when its direction or owner may come from the listener on that port
 * (not for a connecting socket whose owner the kernel knew). */
struct template_key {
	__u8 saddr[16], daddr[16];
	__u64 cgroup_id;
	__u32 netns, tgid;
	__u32 error;   /* the close's error, and the state it closed from: its error and reset fields */
	__u8 last_old;
	__u16 sport;
	__u8 family, first_old, accepted, nstates;
	char comm[NETSTATD_COMM_LEN];
	__u8 states[MAX_STATES];
};

static void make_key(struct template_key *k, const struct short_conn *c)
{
	memset(k, 0, sizeof(*k));
	memcpy(k->saddr, c->last.e.saddr, 16);
	memcpy(k->daddr, c->last.e.daddr, 16);
	k->cgroup_id = c->owner.e.cgroup_id;
	k->netns = c->last.e.netns;
	k->tgid = c->owner.e.tgid;
	k->error = c->last.e.error;
	k->last_old = c->last.e.oldstate;
	k->sport = c->states[0] == TCP_SYN_SENT && c->owner.e.tgid ? 0 : c->last.e.sport;
	k->family = c->last.e.family;
	k->first_old = c->first_old;
	k->accepted = c->accepted;
	k->nstates = c->nstates;
	memcpy(k->comm, c->owner.e.comm, NETSTATD_COMM_LEN);
	memcpy(k->states, c->states, c->nstates);
}

static size_t key_hash(const struct template_key *k)
{
	const unsigned char *p = (const unsigned char *)k;
	size_t h = 1469598103934665603ull; /* FNV-1a */
	for (size_t i = 0; i < sizeof(*k); i++)
		h = (h ^ p[i]) * 1099511628211ull;
	return h;
}

/* The packed connections of a flush, as one array (split() returned them in batches). */
static int each_conn(PyObject *batches, const struct short_conn ***out, Py_ssize_t *count)
{
	if (!PyList_Check(batches)) {
		PyErr_SetString(PyExc_TypeError, "a list of what split() packed");
		return -1;
	}
	Py_ssize_t n = 0;
	for (Py_ssize_t b = 0; b < PyList_GET_SIZE(batches); b++) {
		PyObject *batch = PyList_GET_ITEM(batches, b);
		if (!PyBytes_Check(batch) || PyBytes_GET_SIZE(batch) % sizeof(struct short_conn)) {
			PyErr_SetString(PyExc_ValueError, "takes what split() packed");
			return -1;
		}
		n += PyBytes_GET_SIZE(batch) / (Py_ssize_t)sizeof(struct short_conn);
	}
	const struct short_conn **conns = PyMem_Malloc((n ? n : 1) * sizeof(*conns));
	if (!conns) {
		PyErr_NoMemory();
		return -1;
	}
	Py_ssize_t i = 0;
	for (Py_ssize_t b = 0; b < PyList_GET_SIZE(batches); b++) {
		PyObject *batch = PyList_GET_ITEM(batches, b);
		const struct short_conn *c = (const struct short_conn *)PyBytes_AS_STRING(batch);
		for (Py_ssize_t k = 0; k < PyBytes_GET_SIZE(batch) / (Py_ssize_t)sizeof(struct short_conn); k++)
			conns[i++] = &c[k];
	}
	*out = conns;
	*count = n;
	return 0;
}

/* distinct(packed) -> (reps, index, uses): the connections' distinct template keys. reps: one
 * (last record, owner record, first old state, accepted, states) per key, from its first connection;
 * index: the key number of each connection (native-endian u32s); uses: connections per key. */
static PyObject *distinct(PyObject *self, PyObject *args)
{
	PyObject *batches;
	if (!PyArg_ParseTuple(args, "O:distinct", &batches))
		return NULL;
	const struct short_conn **conns = NULL;
	Py_ssize_t n;
	if (each_conn(batches, &conns, &n) < 0)
		return NULL;
	PyObject *result = NULL, *reps = NULL, *index = NULL, *uses = NULL;
	size_t cap = 16;
	while (cap < 2 * (size_t)n)
		cap <<= 1;
	struct template_key *keys = PyMem_Malloc((n ? n : 1) * sizeof(*keys));
	Py_ssize_t *table = PyMem_Malloc(cap * sizeof(*table));
	Py_ssize_t *counts = PyMem_Malloc((n ? n : 1) * sizeof(*counts));
	if (!keys || !table || !counts) {
		PyErr_NoMemory();
		goto out;
	}
	memset(table, 0xff, cap * sizeof(*table));
	reps = PyList_New(0);
	index = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(__u32));
	if (!reps || !index)
		goto out;
	__u32 *slot_of = (__u32 *)PyBytes_AS_STRING(index);
	Py_ssize_t nkeys = 0;
	for (Py_ssize_t i = 0; i < n; i++) {
		const struct short_conn *c = conns[i];
		make_key(&keys[nkeys], c);
		size_t h = key_hash(&keys[nkeys]) & (cap - 1);
		while (table[h] >= 0 && memcmp(&keys[table[h]], &keys[nkeys], sizeof(*keys)))
			h = (h + 1) & (cap - 1);
		if (table[h] < 0) {
			PyObject *rep = Py_BuildValue("(y#y#iiy#)", (const char *)&c->last, (Py_ssize_t)sizeof(c->last),
						      (const char *)&c->owner, (Py_ssize_t)sizeof(c->owner), c->first_old,
						      c->accepted, (const char *)c->states, (Py_ssize_t)c->nstates);
			int failed = !rep || PyList_Append(reps, rep) < 0;
			Py_XDECREF(rep);
			if (failed)
				goto out;
			counts[nkeys] = 0;
			table[h] = nkeys++;
		}
		slot_of[i] = (__u32)table[h];
		counts[table[h]]++;
	}
	uses = PyList_New(nkeys);
	if (!uses)
		goto out;
	for (Py_ssize_t k = 0; k < nkeys; k++) {
		PyObject *count = PyLong_FromSsize_t(counts[k]);
		if (!count)
			goto out;
		PyList_SET_ITEM(uses, k, count);
	}
	result = PyTuple_Pack(3, reps, index, uses);
out:
	Py_XDECREF(reps);
	Py_XDECREF(index);
	Py_XDECREF(uses);
	PyMem_Free(keys);
	PyMem_Free(table);
	PyMem_Free(counts);
	PyMem_Free(conns);
	return result;
}

static int digits(unsigned long long v)
{
	int n = 1;
	while (v >= 10) {
		v /= 10;
		n++;
	}
	return n;
}

static char *put_uint(char *p, unsigned long long v)
{
	int n = digits(v);
	for (int i = n - 1; i >= 0; i--, v /= 10)
		p[i] = '0' + v % 10;
	return p + n;
}

#define TS_LEN 27 /* 2026-11-27T05:30:00.123456Z, as protocol.WallClock writes it */

struct wall_text {
	long long sec;
	char prefix[20];
};

static void put_timestamp(char *p, struct wall_text *w, long long wall_ns)
{
	long long sec = wall_ns / 1000000000LL, us = wall_ns % 1000000000LL / 1000;
	if (sec != w->sec) {
		time_t t = (time_t)sec;
		struct tm tm;
		gmtime_r(&t, &tm);
		strftime(w->prefix, sizeof(w->prefix), "%Y-%m-%dT%H:%M:%S", &tm);
		w->sec = sec;
	}
	memcpy(p, w->prefix, 19);
	p[19] = '.';
	for (int i = 25; i >= 20; i--, us /= 10)
		p[i] = '0' + us % 10;
	p[26] = 'Z';
}

/* a template's text around timestamp, local port, remote port, cookie and the six counters */
#define PIECES 11

/* render(packed, index, templates, offset_ns) -> the connections' connection.event texts (bytes).
 * templates[index[i]] is the 11 pieces (bytes) of connection i's event around its timestamp, local
 * port, remote port, cookie and counters (events.py STATS_FIELDS), which are written here. */
static PyObject *render(PyObject *self, PyObject *args)
{
	PyObject *batches, *templates;
	Py_buffer index;
	long long offset_ns;
	if (!PyArg_ParseTuple(args, "Oy*O!L:render", &batches, &index, &PyList_Type, &templates, &offset_ns))
		return NULL;
	const struct short_conn **conns = NULL;
	Py_ssize_t n;
	PyObject *events = NULL;
	if (each_conn(batches, &conns, &n) < 0)
		goto fail;
	if (index.len != n * (Py_ssize_t)sizeof(__u32)) {
		PyErr_SetString(PyExc_ValueError, "an index entry per connection (distinct())");
		goto fail;
	}
	for (Py_ssize_t t = 0; t < PyList_GET_SIZE(templates); t++) {
		PyObject *pieces = PyList_GET_ITEM(templates, t);
		if (!PyTuple_Check(pieces) || PyTuple_GET_SIZE(pieces) != PIECES) {
			PyErr_SetString(PyExc_TypeError, "a template is a tuple of 11 bytes pieces");
			goto fail;
		}
		for (int i = 0; i < PIECES; i++)
			if (!PyBytes_Check(PyTuple_GET_ITEM(pieces, i))) {
				PyErr_SetString(PyExc_TypeError, "template pieces are bytes");
				goto fail;
			}
	}
	events = PyList_New(n);
	if (!events)
		goto fail;
	const __u32 *slot_of = index.buf;
	struct wall_text wall = {.sec = -1};
	for (Py_ssize_t i = 0; i < n; i++) {
		const struct short_conn *c = conns[i];
		if (slot_of[i] >= (__u32)PyList_GET_SIZE(templates)) {
			PyErr_SetString(PyExc_IndexError, "an index entry without its template");
			goto fail;
		}
		PyObject *pieces = PyList_GET_ITEM(templates, slot_of[i]);
		const struct netstat_event *e = &c->last.e;
		unsigned long long fields[PIECES - 1] = {
			0, e->sport, e->dport, e->cookie, e->bytes_acked, e->bytes_received,
			e->segs_out, e->segs_in, e->srtt_us, e->total_retrans,
		};
		Py_ssize_t len = TS_LEN;
		for (int p = 0; p < PIECES; p++)
			len += PyBytes_GET_SIZE(PyTuple_GET_ITEM(pieces, p));
		for (int f = 1; f < PIECES - 1; f++)
			len += digits(fields[f]);
		PyObject *text = PyBytes_FromStringAndSize(NULL, len);
		if (!text)
			goto fail;
		char *out = PyBytes_AS_STRING(text);
		for (int p = 0; p < PIECES; p++) {
			PyObject *piece = PyTuple_GET_ITEM(pieces, p);
			memcpy(out, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece));
			out += PyBytes_GET_SIZE(piece);
			if (p == 0) {
				put_timestamp(out, &wall, (long long)c->last.e.ts_ns + offset_ns);
				out += TS_LEN;
			} else if (p < PIECES - 1) {
				out = put_uint(out, fields[p]);
			}
		}
		PyList_SET_ITEM(events, i, text);
	}
	PyMem_Free(conns);
	PyBuffer_Release(&index);
	return events;
fail:
	Py_XDECREF(events);
	PyMem_Free(conns);
	PyBuffer_Release(&index);
	return NULL;
}

/* byte_sums(packed, index, ntemplates) -> [(sent, received)] per template: the payload bytes of the
 * connections each template stands for (per-namespace byte metrics). */
static PyObject *byte_sums(PyObject *self, PyObject *args)
{
	PyObject *batches, *result = NULL;
	Py_buffer index;
	Py_ssize_t ntemplates, n;
	const struct short_conn **conns = NULL;
	unsigned long long *sums = NULL;
	if (!PyArg_ParseTuple(args, "Oy*n:byte_sums", &batches, &index, &ntemplates))
		return NULL;
	if (ntemplates < 0 || each_conn(batches, &conns, &n) < 0)
		goto out;
	if (index.len != n * (Py_ssize_t)sizeof(__u32)) {
		PyErr_SetString(PyExc_ValueError, "an index entry per connection (distinct())");
		goto out;
	}
	sums = PyMem_Calloc(2 * (size_t)(ntemplates ? ntemplates : 1), sizeof(*sums));
	if (!sums) {
		PyErr_NoMemory();
		goto out;
	}
	const __u32 *slot_of = index.buf;
	for (Py_ssize_t i = 0; i < n; i++) {
		if (slot_of[i] >= (__u32)ntemplates) {
			PyErr_SetString(PyExc_IndexError, "an index entry without its template");
			goto out;
		}
		sums[2 * slot_of[i]] += conns[i]->last.e.bytes_acked;
		sums[2 * slot_of[i] + 1] += conns[i]->last.e.bytes_received;
	}
	result = PyList_New(ntemplates);
	for (Py_ssize_t t = 0; result && t < ntemplates; t++) {
		PyObject *pair = Py_BuildValue("(KK)", sums[2 * t], sums[2 * t + 1]);
		if (!pair) {
			Py_CLEAR(result);
			break;
		}
		PyList_SET_ITEM(result, t, pair);
	}
out:
	PyMem_Free(sums);
	PyMem_Free(conns);
	PyBuffer_Release(&index);
	return result;
}

/* count_kinds(chunk, counts): counts[kind | family << 8 | oldstate << 16 | newstate << 24] += records
 * (Tracker.record_counts, as memoryview(chunk).cast("I")[KIND_WORD::RECORD_WORDS] lists them). */
static PyObject *count_kinds(PyObject *self, PyObject *args)
{
	Py_buffer chunk;
	PyObject *counts;
	if (!PyArg_ParseTuple(args, "y*O!:count_kinds", &chunk, &PyDict_Type, &counts))
		return NULL;
	enum { SLOTS = 1024 }; /* distinct words of a chunk: a few dozen kinds and transitions */
	__u32 words[SLOTS];
	Py_ssize_t hits[SLOTS];
	memset(hits, 0, sizeof(hits));
	Py_ssize_t n = chunk.len / (Py_ssize_t)sizeof(struct record), used = 0;
	PyObject *result = NULL;
	for (Py_ssize_t i = 0; i <= n; i++) {
		__u32 word = 0;
		if (i < n) {
			const struct netstat_event *e = &record_at(chunk.buf, i)->e;
			word = e->kind | e->family << 8 | e->oldstate << 16 | (__u32)e->newstate << 24;
			size_t h = (word * 2654435761u) & (SLOTS - 1);
			while (hits[h] && words[h] != word)
				h = (h + 1) & (SLOTS - 1);
			used += !hits[h];
			words[h] = word;
			hits[h]++;
		}
		if (i < n && used < SLOTS / 2)
			continue;
		/* the end, or a table half full (records of no kind known): add to the dict, start again */
		for (size_t h = 0; h < SLOTS; h++) {
			if (!hits[h])
				continue;
			PyObject *key = PyLong_FromUnsignedLong(words[h]);
			PyObject *old = key ? PyDict_GetItemWithError(counts, key) : NULL;
			Py_ssize_t before = old ? PyLong_AsSsize_t(old) : 0;
			PyObject *value = PyErr_Occurred() ? NULL : PyLong_FromSsize_t(before + hits[h]);
			int failed = !value || PyDict_SetItem(counts, key, value) < 0;
			Py_XDECREF(key);
			Py_XDECREF(value);
			if (failed)
				goto out;
			hits[h] = 0;
		}
		used = 0;
	}
	result = Py_NewRef(Py_None);
out:
	PyBuffer_Release(&chunk);
	return result;
}

static PyMethodDef methods[] = {
	{"split", split, METH_VARARGS,
	 "split(chunk, known) -> (rest, packed, owners, carry): take out the short TCP connections whose cookie is in "
	 "none of the containers of the tuple known"},
	{"count_kinds", count_kinds, METH_VARARGS,
	 "count_kinds(chunk, counts): add the chunk's records to counts by kind, family and states"},
	{"distinct", distinct, METH_VARARGS,
	 "distinct(packed_list) -> (reps, index, uses): the packed connections' distinct templates"},
	{"render", render, METH_VARARGS,
	 "render(packed_list, index, templates, offset_ns) -> the packed connections' event texts (bytes)"},
	{"byte_sums", byte_sums, METH_VARARGS,
	 "byte_sums(packed_list, index, ntemplates) -> [(sent, received)]: payload bytes per template"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_shortconn", "Native path for short TCP connections (see shortconn.c)", -1, methods,
};

PyMODINIT_FUNC PyInit__shortconn(void)
{
	return PyModule_Create(&module);
}
