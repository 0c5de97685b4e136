/* gc_seam.c - the writer side of `castore gc`, across processes
 * (docs/design.md, "Writers and gc"; local_i.h has the API).
 *
 * Three kinds of lock file, all flock(2) (released by the kernel when a
 * process dies, so a crash never leaves one held):
 *   DIR/gc.lock         a writer step (a presence check and its pin, a
 *                       group's commit and its pins) holds it shared; a gc
 *                       sweep holds it exclusively, so it sees every pin
 *                       of a step that found an object present;
 *   DIR/gc.turn         Linux gives an exclusive flock waiter no priority
 *                       over new shared holders, so a gc takes gc.turn
 *                       exclusively before it waits for gc.lock, and a
 *                       step takes gc.turn shared for an instant first:
 *                       once a gc waits, no new step starts;
 *   DIR/live/<pid>      every process with the store open for writing
 *                       holds its own shared: a file in tmp/ named
 *                       "<pid>.<...>" belongs to a live writer exactly
 *                       when that lock is held (a reused pid only keeps
 *                       leftovers longer, never removes a live file).
 * A pin file tmp/pins.<pid>.<n> is held exclusively by its session and
 * made inside a step (so a sweep never sees it unlocked while its owner
 * lives); one gc can lock is a dead session's.
 */
#include "store/local_i.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

static int flock_wait(int fd, int op)
{
	while (flock(fd, op) < 0)
		if (errno != EINTR)
			return cas_negerrno();
	return 0;
}

int cas_local_gc_enter(struct cas_local *ls)
{
	if (ls->gc_lock_fd < 0)
		return 0;
	int r = 0;
	pthread_mutex_lock(&ls->gc_mu);
	for (;;) {
		if (ls->gc_holders == 0) {
			r = flock_wait(ls->gc_turn_fd, LOCK_SH);
			if (r == 0) {
				r = flock_wait(ls->gc_lock_fd, LOCK_SH);
				(void)flock(ls->gc_turn_fd, LOCK_UN);
			}
			break;
		}
		/* This process holds gc.lock already; but overlapping steps
		 * of its threads must not keep it forever once a gc waits
		 * (it holds gc.turn): then wait for the steps in flight. */
		if (flock(ls->gc_turn_fd, LOCK_SH | LOCK_NB) == 0) {
			(void)flock(ls->gc_turn_fd, LOCK_UN);
			break;
		}
		if (errno != EWOULDBLOCK && errno != EINTR) {
			r = cas_negerrno();
			break;
		}
		if (errno == EWOULDBLOCK)
			pthread_cond_wait(&ls->gc_cond, &ls->gc_mu);
	}
	if (r == 0)
		ls->gc_holders++;
	pthread_mutex_unlock(&ls->gc_mu);
	if (r < 0)
		return cas_log_errno(r, "store %s: lock gc.lock: %m", ls->dir);
	return 0;
}

void cas_local_gc_leave(struct cas_local *ls)
{
	if (ls->gc_lock_fd < 0)
		return;
	pthread_mutex_lock(&ls->gc_mu);
	/* Released as soon as no step of this process needs it: an idle
	 * writer (a mounted cache) must not hold gc off. */
	if (ls->gc_holders > 0 && --ls->gc_holders == 0) {
		(void)flock(ls->gc_lock_fd, LOCK_UN);
		pthread_cond_broadcast(&ls->gc_cond);
	}
	pthread_mutex_unlock(&ls->gc_mu);
}

int cas_local_pins_add(struct cas_local *ls, struct cas_local_pins *p,
		       const cas_digest *d, size_t n)
{
	if (ls->gc_lock_fd < 0 || n == 0)
		return 0;
	if (p->fd < 0) {
		uint64_t k = atomic_fetch_add(&ls->pin_counter, 1);
		snprintf(p->name, sizeof(p->name), "pins.%d.%llu", ls->pid,
			 (unsigned long long)k);
		int fd = openat(ls->tmp_fd, p->name,
				O_CREAT | O_EXCL | O_WRONLY | O_APPEND |
					O_CLOEXEC,
				0644);
		if (fd < 0)
			return cas_log_errno(cas_negerrno(),
					     "store %s: pin file: %m", ls->dir);
		if (flock_wait(fd, LOCK_EX) < 0) {
			int r = cas_negerrno();
			unlinkat(ls->tmp_fd, p->name, 0);
			close(fd);
			return cas_log_errno(r, "store %s: pin file: %m",
					     ls->dir);
		}
		p->fd = fd;
	}
	/* Not synced: a pin only matters while its writer lives. */
	int r = cas_write_all(p->fd, d, n * sizeof(*d));
	if (r < 0)
		return cas_log_errno(r, "store %s: write pin file: %m",
				     ls->dir);
	return 0;
}

void cas_local_pins_release(struct cas_local *ls, struct cas_local_pins *p)
{
	if (p->fd < 0)
		return;
	/* Unlinked before it is unlocked: a gc never reads a released pin
	 * file as a dead writer's with pins it still needs (it would drop
	 * them either way). */
	unlinkat(ls->tmp_fd, p->name, 0);
	close(p->fd);
	p->fd = -1;
}

static int open_lock_file(struct cas_local *ls, const char *name, int *ret_fd)
{
	int fd = openat(ls->dir_fd, name, O_CREAT | O_RDWR | O_CLOEXEC, 0644);
	if (fd < 0)
		return cas_log_errno(cas_negerrno(), "store %s: open %s: %m",
				     ls->dir, name);
	*ret_fd = fd;
	return 0;
}

int cas_local_gc_seam_open(struct cas_local *ls)
{
	int r = open_lock_file(ls, "gc.lock", &ls->gc_lock_fd);
	if (r == 0)
		r = open_lock_file(ls, "gc.turn", &ls->gc_turn_fd);
	if (r < 0)
		return r;
	if (mkdirat(ls->dir_fd, "live", 0755) < 0 && errno != EEXIST)
		return cas_log_errno(cas_negerrno(), "store %s: mkdir live: %m",
				     ls->dir);
	ls->live_dir_fd =
		openat(ls->dir_fd, "live", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (ls->live_dir_fd < 0)
		return cas_log_errno(cas_negerrno(), "store %s: open live: %m",
				     ls->dir);
	char name[32];
	snprintf(name, sizeof(name), "%d", ls->pid);
	/* A gc may remove a dead process's file between our open and our
	 * flock: lock, then check that the name is still this file. */
	for (int tries = 0; tries < 100; tries++) {
		int fd = openat(ls->live_dir_fd, name,
				O_CREAT | O_RDWR | O_CLOEXEC, 0644);
		if (fd < 0)
			break;
		struct stat a, b;
		if (flock_wait(fd, LOCK_SH) == 0 && fstat(fd, &a) == 0 &&
		    fstatat(ls->live_dir_fd, name, &b, AT_SYMLINK_NOFOLLOW) ==
			    0 &&
		    a.st_ino == b.st_ino && a.st_dev == b.st_dev) {
			ls->live_fd = fd;
			return 0;
		}
		close(fd);
	}
	return cas_log_errno(cas_negerrno(), "store %s: live/%s: %m", ls->dir,
			     name);
}

void cas_local_gc_seam_close(struct cas_local *ls)
{
	if (ls->live_fd >= 0) {
		/* The last handle of this process removes its liveness file
		 * (another one holds it shared, and the EX fails). */
		close(ls->live_fd);
		ls->live_fd = -1;
		char name[32];
		snprintf(name, sizeof(name), "%d", ls->pid);
		int fd = openat(ls->live_dir_fd, name,
				O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0)
			unlinkat(ls->live_dir_fd, name, 0);
		if (fd >= 0)
			close(fd);
	}
	int *fds[] = {&ls->gc_lock_fd, &ls->gc_turn_fd, &ls->live_dir_fd};
	for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
		if (*fds[i] >= 0)
			close(*fds[i]);
		*fds[i] = -1;
	}
}

/* The pid a tmp/ name starts with ("<pid>." or "pins.<pid>."), or -1. */
static long name_pid(const char *name)
{
	if (!strncmp(name, "pins.", 5))
		name += 5;
	char *end;
	if (*name < '1' || *name > '9')
		return -1;
	long pid = strtol(name, &end, 10);
	return *end == '.' && pid > 0 ? pid : -1;
}

int cas_local_tmp_owner_alive(int live_dir_fd, const char *name)
{
	long pid = name_pid(name);
	if (pid < 0)
		return -EINVAL;
	char live[32];
	snprintf(live, sizeof(live), "%ld", pid);
	if (live_dir_fd < 0)
		return 0; /* no writer ever made one */
	int fd = openat(live_dir_fd, live, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return errno == ENOENT ? 0 : 1; /* in doubt, alive */
	int alive = flock(fd, LOCK_EX | LOCK_NB) < 0 ? 1 : 0;
	close(fd);
	return alive;
}

void cas_local_tmp_sweep(struct cas_local *ls, long max_age_s,
			 uint64_t *ret_files, uint64_t *ret_bytes)
{
	if (ls->tmp_fd < 0)
		return;
	int fd = openat(ls->tmp_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return;
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return;
	}
	time_t now = time(NULL);
	struct dirent *de;
	while ((de = readdir(d))) {
		struct stat st;
		if (de->d_name[0] == '.' || !strncmp(de->d_name, "pins.", 5))
			continue;
		if (fstatat(ls->tmp_fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) <
		    0)
			continue;
		int alive =
			cas_local_tmp_owner_alive(ls->live_dir_fd, de->d_name);
		if (alive > 0 || (alive < 0 && st.st_mtime + max_age_s > now))
			continue;
		if (unlinkat(ls->tmp_fd, de->d_name, 0) < 0)
			continue;
		if (ret_files)
			(*ret_files)++;
		if (ret_bytes)
			*ret_bytes += (uint64_t)st.st_size;
	}
	closedir(d);
}
