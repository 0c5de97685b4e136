/* Inode numbers, the inode table and the Directory cache of castorefs.
 *
 * Inode numbers
 * -------------
 * Linux allows a directory inode under one name only, and overlayfs, bind
 * mounts, getcwd and `..` all rely on an inode meaning one path. So every
 * path gets its own number, and the number is computed from the path, not
 * remembered: it is the path's preorder index within its named root.
 *
 * castore v1 gives every DirectoryNode a `size`: the number of entries
 * below it (its entries plus the sizes of its child directories). Number a
 * tree in preorder, a folder before its entries, and in Directory order
 * (directories, then files, then symlinks, each sorted by name): a folder
 * numbered N with declared size S holds exactly the numbers N+1 .. N+S,
 * and its entry k is numbered
 *
 *   N + 1 + (1 + size) summed over the directories before k
 *         + the number of files and symlinks before k.
 *
 * The sums over directories (spans) are computed once per decoded
 * Directory and cached with it, so a child's number is one addition.
 *
 * Each named root gets a base from a counter when its (name, root node)
 * pair is first met and keeps it for the mount's life (struct
 * cas_root_bases); the root is numbered base, its tree base+1 ..
 * base+size. A root that `roots add` replaces gets a fresh range, so an
 * old number never starts meaning new content. 1 is the root folder.
 *
 * So a number never names two paths, and the same path always gets the
 * same number: after FORGET, after `echo 2 > drop_caches`, from a plain
 * READDIR (d_ino) or a LOOKUP. Nothing is kept for inodes the kernel has
 * forgotten.
 *
 * The sizes come from the store, so they are checked before use: when a
 * folder's Directory is loaded, the entries it really has below it (its
 * spans plus its files and symlinks) must equal the size its parent (or
 * its root node) declared, else the folder gives EIO, logged once. With
 * every folder checked on the way down, a child's range lies inside its
 * parent's and no two paths can share a number. The counter refuses a root
 * whose range does not fit 64 bits (EOVERFLOW, the root gives EIO).
 *
 * Equal content is still one object in the store and in the page cache:
 * equal files open the same blob (one backing file for passthrough, one
 * pack range for splice), equal folders share one cached Directory.
 *
 * The inode table
 * ---------------
 * The kernel holds a lookup reference on each inode it caches; for each
 * the table keeps one 56-byte record (struct cas_inode: number, digest,
 * size, kind, lookup count, and a folder's distance to its parent's
 * number, which never changes since a number is one path). Records are dense in chunks of
 * RECORDS_PER_CHUNK: a FORGET that ends a record moves the last record
 * into its place, and a chunk that empties is freed. They are found by
 * number through an open-addressing index (linear probing, 32-bit record
 * ids, load kept between 1/8 and 3/4; deletion shifts back, so there are
 * no tombstones). About 62 bytes per inode in all.
 */
#include "castorefs/inodes_i.h"

#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"

#define RECORDS_PER_CHUNK 1024
#define INDEX_MIN	  1024

_Static_assert(sizeof(struct cas_inode) == 56, "inode records are 56 bytes");

/* Inode table ----------------------------------------------------------- */

static size_t slot_of(const struct cas_inode_table *t, uint64_t ino)
{
	return (size_t)((ino * 0x9e3779b97f4a7c15ull) >> 32) & t->mask;
}

static struct cas_inode *record(const struct cas_inode_table *t, uint32_t id)
{
	return &t->chunks[id / RECORDS_PER_CHUNK][id % RECORDS_PER_CHUNK];
}

int cas_inode_table_init(struct cas_inode_table *t, atomic_size_t *memory)
{
	memset(t, 0, sizeof(*t));
	t->slots = calloc(INDEX_MIN, sizeof(*t->slots));
	if (!t->slots)
		return -ENOMEM;
	t->mask = INDEX_MIN - 1;
	t->memory = memory;
	atomic_fetch_add(memory, INDEX_MIN * sizeof(*t->slots));
	pthread_mutex_init(&t->lock, NULL);
	return 0;
}

void cas_inode_table_release(struct cas_inode_table *t)
{
	for (size_t i = 0; i < t->n_chunks; i++)
		free(t->chunks[i]);
	free(t->chunks);
	free(t->slots);
	pthread_mutex_destroy(&t->lock);
}

/* The slot holding ino, or the empty slot where it would go. */
static size_t find_slot(const struct cas_inode_table *t, uint64_t ino)
{
	size_t i = slot_of(t, ino);
	while (t->slots[i] && record(t, t->slots[i] - 1)->ino != ino)
		i = (i + 1) & t->mask;
	return i;
}

/* Rebuilds the index with n slots (a power of two that holds every
 * record). A failed allocation keeps the old index. */
static void index_resize(struct cas_inode_table *t, size_t n)
{
	uint32_t *slots = calloc(n, sizeof(*slots));
	if (!slots)
		return;
	size_t old = t->mask + 1;
	free(t->slots);
	t->slots = slots;
	t->mask = n - 1;
	for (size_t id = 0; id < t->n; id++)
		t->slots[find_slot(t, record(t, (uint32_t)id)->ino)] =
			(uint32_t)id + 1;
	if (n > old)
		atomic_fetch_add(t->memory, (n - old) * sizeof(*slots));
	else
		atomic_fetch_sub(t->memory, (old - n) * sizeof(*slots));
}

/* Empties slot i and shifts back the entries of its probe run that would
 * no longer be found (deletion without tombstones). */
static void slot_clear(struct cas_inode_table *t, size_t i)
{
	size_t j = i;
	t->slots[i] = 0;
	for (;;) {
		j = (j + 1) & t->mask;
		if (!t->slots[j])
			return;
		size_t home = slot_of(t, record(t, t->slots[j] - 1)->ino);
		/* Entry j stays if its home lies cyclically in (i, j]. */
		bool stays = i <= j ? (i < home && home <= j)
				    : (i < home || home <= j);
		if (stays)
			continue;
		t->slots[i] = t->slots[j];
		t->slots[j] = 0;
		i = j;
	}
}

int cas_inode_table_get(struct cas_inode_table *t, uint64_t ino,
			struct cas_inode *ret)
{
	pthread_mutex_lock(&t->lock);
	size_t i = find_slot(t, ino);
	int r = -ESTALE;
	if (t->slots[i]) {
		*ret = *record(t, t->slots[i] - 1);
		r = 0;
	}
	pthread_mutex_unlock(&t->lock);
	return r;
}

int cas_inode_table_ref(struct cas_inode_table *t, const struct cas_inode *in)
{
	int r = 0;
	pthread_mutex_lock(&t->lock);
	size_t i = find_slot(t, in->ino);
	if (t->slots[i]) {
		struct cas_inode *rec = record(t, t->slots[i] - 1);
		if (rec->nlookup < CAS_INODE_NLOOKUP_MAX)
			rec->nlookup++;
		goto out;
	}
	/* A failed index_resize must not let the index fill up (probes would
	 * never end). */
	if (t->n >= UINT32_MAX - 1 || t->n + 2 > t->mask + 1) {
		r = -ENOMEM;
		goto out;
	}
	if (t->n == t->n_chunks * RECORDS_PER_CHUNK) {
		if (t->n_chunks == t->chunks_cap) {
			size_t cap = t->chunks_cap ? t->chunks_cap * 2 : 16;
			struct cas_inode **c =
				realloc(t->chunks, cap * sizeof(*c));
			if (!c) {
				r = -ENOMEM;
				goto out;
			}
			atomic_fetch_add(t->memory,
					 (cap - t->chunks_cap) * sizeof(*c));
			t->chunks = c;
			t->chunks_cap = cap;
		}
		struct cas_inode *chunk =
			malloc(RECORDS_PER_CHUNK * sizeof(*chunk));
		if (!chunk) {
			r = -ENOMEM;
			goto out;
		}
		t->chunks[t->n_chunks++] = chunk;
		atomic_fetch_add(t->memory, RECORDS_PER_CHUNK * sizeof(*chunk));
	}
	uint32_t id = (uint32_t)t->n++;
	struct cas_inode *rec = record(t, id);
	*rec = *in;
	rec->nlookup = 1;
	t->slots[i] = id + 1;
	if (t->n * 4 > (t->mask + 1) * 3)
		index_resize(t, (t->mask + 1) * 2);
out:
	pthread_mutex_unlock(&t->lock);
	return r;
}

void cas_inode_table_forget(struct cas_inode_table *t, uint64_t ino, uint64_t n)
{
	pthread_mutex_lock(&t->lock);
	size_t i = find_slot(t, ino);
	if (!t->slots[i])
		goto out;
	uint32_t id = t->slots[i] - 1;
	struct cas_inode *rec = record(t, id);
	if (rec->nlookup == CAS_INODE_NLOOKUP_MAX)
		goto out; /* saturated: its true count is unknown */
	if (rec->nlookup > n) {
		rec->nlookup -= (uint32_t)n; /* n < nlookup < 2^28 */
		goto out;
	}
	slot_clear(t, i);
	uint32_t last = (uint32_t)--t->n;
	if (id != last) {
		/* Keep the records dense: the last one moves into the hole. */
		struct cas_inode *moved = record(t, last);
		size_t j = find_slot(t, moved->ino);
		*rec = *moved;
		t->slots[j] = id + 1;
	}
	/* Free the last chunk once it is empty and half of the one before
	 * is free too (no chunk churn at a boundary). */
	while (t->n_chunks > 1 &&
	       t->n + RECORDS_PER_CHUNK / 2 <=
		       (t->n_chunks - 1) * RECORDS_PER_CHUNK) {
		free(t->chunks[--t->n_chunks]);
		atomic_fetch_sub(t->memory,
				 RECORDS_PER_CHUNK * sizeof(struct cas_inode));
	}
	if (t->mask + 1 > INDEX_MIN && t->n * 8 < t->mask + 1)
		index_resize(t, (t->mask + 1) / 2);
out:
	pthread_mutex_unlock(&t->lock);
}

size_t cas_inode_table_count(struct cas_inode_table *t)
{
	pthread_mutex_lock(&t->lock);
	size_t n = t->n;
	pthread_mutex_unlock(&t->lock);
	return n;
}

/* Directory cache -------------------------------------------------------- */

static size_t dir_bucket(const cas_digest *d)
{
	uint32_t h;
	memcpy(&h, d->bytes, sizeof(h)); /* a digest is uniformly random */
	return h % CAS_DIR_CACHE_BUCKETS;
}

void cas_dir_cache_init(struct cas_dir_cache *c, size_t limit,
			atomic_size_t *memory)
{
	memset(c, 0, sizeof(*c));
	pthread_mutex_init(&c->lock, NULL);
	c->lru.lru_next = c->lru.lru_prev = &c->lru;
	c->limit = limit;
	c->memory = memory;
}

static void dir_entry_free(struct cas_dir_cache *c, struct cas_dir_entry *e)
{
	atomic_fetch_sub(c->memory, e->bytes);
	cas_directory_free(e->dir);
	free(e->spans);
	free(e);
}

void cas_dir_cache_release(struct cas_dir_cache *c)
{
	struct cas_dir_entry *e = c->lru.lru_next, *next;
	for (; e != &c->lru; e = next) {
		next = e->lru_next;
		dir_entry_free(c, e);
	}
	pthread_mutex_destroy(&c->lock);
}

static struct cas_dir_entry *dir_find(struct cas_dir_cache *c,
				      const cas_digest *d)
{
	struct cas_dir_entry *e = c->buckets[dir_bucket(d)];
	while (e && memcmp(e->digest.bytes, d->bytes, CAS_DIGEST_LEN))
		e = e->next_hash;
	return e;
}

static void lru_unlink(struct cas_dir_entry *e)
{
	e->lru_prev->lru_next = e->lru_next;
	e->lru_next->lru_prev = e->lru_prev;
}

static void lru_push(struct cas_dir_cache *c, struct cas_dir_entry *e)
{
	e->lru_next = c->lru.lru_next;
	e->lru_prev = &c->lru;
	c->lru.lru_next->lru_prev = e;
	c->lru.lru_next = e;
}

/* Takes e out of the cache; it is freed now or at its last put. Returns
 * it if the caller must free it (after unlocking). */
static struct cas_dir_entry *dir_evict(struct cas_dir_cache *c,
				       struct cas_dir_entry *e)
{
	struct cas_dir_entry **p = &c->buckets[dir_bucket(&e->digest)];
	while (*p != e)
		p = &(*p)->next_hash;
	*p = e->next_hash;
	lru_unlink(e);
	e->cached = false;
	c->bytes -= e->bytes;
	return e->refs ? NULL : e;
}

/* Builds an entry: spans and the real size of the Directory. */
static int dir_entry_new(cas_directory *d, const cas_digest *digest,
			 struct cas_dir_entry **ret)
{
	struct cas_dir_entry *e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->spans = malloc((d->n_directories + 1) * sizeof(*e->spans));
	if (!e->spans) {
		free(e);
		return -ENOMEM;
	}
	e->digest = *digest;
	e->dir = d;
	uint64_t sum = 0;
	bool ok = true;
	for (size_t j = 0; j < d->n_directories; j++) {
		e->spans[j] = sum;
		uint64_t span = d->directories[j].size + 1;
		ok = ok && span != 0 && sum <= UINT64_MAX - span;
		sum += span;
	}
	e->spans[d->n_directories] = sum;
	uint64_t rest = d->n_files + d->n_symlinks;
	ok = ok && sum <= UINT64_MAX - rest;
	e->size = sum + rest;
	e->size_ok = ok;
	e->bytes = malloc_usable_size(e) + malloc_usable_size(e->spans) +
		   malloc_usable_size(d);
	*ret = e;
	return 0;
}

int cas_dir_cache_get(struct cas_dir_cache *c, cas_store *store,
		      const cas_digest *d, struct cas_dir_entry **ret)
{
	pthread_mutex_lock(&c->lock);
	struct cas_dir_entry *e = dir_find(c, d);
	if (e) {
		e->refs++;
		lru_unlink(e);
		lru_push(c, e);
		pthread_mutex_unlock(&c->lock);
		*ret = e;
		return 0;
	}
	pthread_mutex_unlock(&c->lock);

	cas_directory *dir;
	int r = cas_store_directory_get(store, d, &dir);
	if (r < 0)
		return r;
	struct cas_dir_entry *new;
	r = dir_entry_new(dir, d, &new);
	if (r < 0) {
		cas_directory_free(dir);
		return r;
	}
	atomic_fetch_add(c->memory, new->bytes);

	pthread_mutex_lock(&c->lock);
	e = dir_find(c, d);
	if (e) { /* another thread loaded it meanwhile */
		e->refs++;
		lru_unlink(e);
		lru_push(c, e);
		pthread_mutex_unlock(&c->lock);
		dir_entry_free(c, new);
		*ret = e;
		return 0;
	}
	size_t b = dir_bucket(d);
	new->next_hash = c->buckets[b];
	c->buckets[b] = new;
	new->refs = 1;
	new->cached = true;
	lru_push(c, new);
	c->bytes += new->bytes;
	/* Over the bound: evict from the cold end, never the newest (a
	 * folder larger than the bound stays while it is the one in use). */
	struct cas_dir_entry *dead[16];
	size_t n_dead = 0;
	struct cas_dir_entry *v = c->lru.lru_prev;
	while (c->bytes > c->limit &&
	       v != new &&n_dead < CAS_ARRAY_SIZE(dead)) {
		struct cas_dir_entry *prev = v->lru_prev;
		struct cas_dir_entry *gone = dir_evict(c, v);
		if (gone)
			dead[n_dead++] = gone;
		v = prev;
	}
	pthread_mutex_unlock(&c->lock);
	for (size_t i = 0; i < n_dead; i++)
		dir_entry_free(c, dead[i]);
	*ret = new;
	return 0;
}

void cas_dir_cache_put(struct cas_dir_cache *c, struct cas_dir_entry *e)
{
	if (!e)
		return;
	pthread_mutex_lock(&c->lock);
	bool gone = --e->refs == 0 && !e->cached;
	pthread_mutex_unlock(&c->lock);
	if (gone)
		dir_entry_free(c, e);
}

uint64_t cas_dir_entry_ino(const struct cas_dir_entry *e, uint64_t ino,
			   const cas_node *node)
{
	const cas_directory *d = e->dir;
	uint64_t first = ino + 1;
	if (node >= d->directories && node < d->directories + d->n_directories)
		return first + e->spans[node - d->directories];
	first += e->spans[d->n_directories];
	if (node >= d->files && node < d->files + d->n_files)
		return first + (uint64_t)(node - d->files);
	return first + d->n_files + (uint64_t)(node - d->symlinks);
}

/* Named-root bases ------------------------------------------------------- */

struct cas_root_base {
	struct cas_root_base *next;
	uint64_t base;
	cas_node *node; /* owns its name (the root's name) and target */
	uint32_t hash;
};

static uint32_t root_hash(const char *name)
{
	uint32_t h = 2166136261u; /* FNV-1a */
	for (; *name; name++)
		h = (h ^ (uint8_t)*name) * 16777619u;
	return h;
}

static bool same_node(const cas_node *a, const cas_node *b)
{
	if (a->type != b->type)
		return false;
	if (a->type == CAS_NODE_SYMLINK)
		return a->target_len == b->target_len &&
		       !memcmp(a->target, b->target, a->target_len);
	return a->size == b->size && a->executable == b->executable &&
	       !memcmp(a->digest.bytes, b->digest.bytes, CAS_DIGEST_LEN);
}

void cas_root_bases_init(struct cas_root_bases *b, uint64_t first,
			 atomic_size_t *memory)
{
	memset(b, 0, sizeof(*b));
	pthread_mutex_init(&b->lock, NULL);
	b->next = first;
	b->memory = memory;
}

void cas_root_bases_release(struct cas_root_bases *b)
{
	for (size_t i = 0; i < b->n; i++) {
		free(b->by_base[i]->node);
		free(b->by_base[i]);
	}
	free(b->by_base);
	pthread_mutex_destroy(&b->lock);
}

int cas_root_bases_get(struct cas_root_bases *b, const char *name,
		       const cas_node *node, uint64_t *ret_base)
{
	uint32_t h = root_hash(name);
	size_t name_len = strlen(name);
	int r = 0;
	pthread_mutex_lock(&b->lock);
	struct cas_root_base *e = b->buckets[h % CAS_ARRAY_SIZE(b->buckets)];
	for (; e; e = e->next)
		if (e->hash == h && e->node->name_len == name_len &&
		    !memcmp(e->node->name, name, name_len) &&
		    same_node(e->node, node)) {
			*ret_base = e->base;
			goto out;
		}
	uint64_t span = node->type == CAS_NODE_DIRECTORY ? node->size : 0;
	if (span >= UINT64_MAX - b->next) {
		r = -EOVERFLOW;
		goto out;
	}
	if (b->n == b->cap) {
		size_t cap = b->cap ? b->cap * 2 : 16;
		struct cas_root_base **a =
			realloc(b->by_base, cap * sizeof(*a));
		if (!a) {
			r = -ENOMEM;
			goto out;
		}
		b->by_base = a;
		b->cap = cap;
	}
	e = calloc(1, sizeof(*e));
	cas_node named = *node;
	named.name = (const uint8_t *)name;
	named.name_len = name_len;
	if (e)
		e->node = cas_node_dup(&named);
	if (!e || !e->node) {
		free(e);
		r = -ENOMEM;
		goto out;
	}
	e->hash = h;
	e->base = b->next;
	b->next += span + 1;
	e->next = b->buckets[h % CAS_ARRAY_SIZE(b->buckets)];
	b->buckets[h % CAS_ARRAY_SIZE(b->buckets)] = e;
	b->by_base[b->n++] = e; /* bases only grow: the array stays sorted */
	atomic_fetch_add(b->memory,
			 malloc_usable_size(e) + malloc_usable_size(e->node));
	*ret_base = e->base;
out:
	pthread_mutex_unlock(&b->lock);
	return r;
}

int cas_root_bases_target(struct cas_root_bases *b, uint64_t base, char *buf,
			  size_t size)
{
	int r = -ENOENT;
	pthread_mutex_lock(&b->lock);
	size_t lo = 0, hi = b->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (b->by_base[mid]->base < base)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < b->n && b->by_base[lo]->base == base &&
	    b->by_base[lo]->node->type == CAS_NODE_SYMLINK) {
		const cas_node *n = b->by_base[lo]->node;
		size_t len = CAS_MIN(size, n->target_len);
		memcpy(buf, n->target, len);
		r = (int)CAS_MIN(len, (size_t)INT32_MAX);
	}
	pthread_mutex_unlock(&b->lock);
	return r;
}
