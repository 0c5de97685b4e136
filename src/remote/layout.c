/* layout.c - the roots file, the Directory packs and the tree files of a
 * published HTTP layout (remote_i.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/directory.h"
#include "core/log.h"
#include "core/util.h"
#include "core/varint.h"
#include "remote/remote_i.h"

int cas_roots_file_write_line(FILE *f, const char *name, const cas_node *node)
{
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len;
	cas_node n = *node;
	int r;

	n.name = NULL;
	n.name_len = 0;
	r = cas_node_encode(&n, &buf, &len, NULL);
	if (r < 0)
		return r;
	_cleanup_free_ char *hex = malloc(2 * len + 1);
	if (!hex)
		return -ENOMEM;
	for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
		if (*p <= 0x20 || *p >= 0x7f || *p == '%') {
			char esc[3];
			cas_hex_encode(p, 1, esc);
			fprintf(f, "%%%s", esc);
		} else {
			fputc(*p, f);
		}
	}
	cas_hex_encode(buf, len, hex);
	fprintf(f, "\t%s\n", hex);
	return ferror(f) ? -EIO : 0;
}

static int parse_line(const char *line, size_t len, cas_root_cb cb,
		      void *userdata)
{
	const char *tab = memchr(line, '\t', len);
	if (!tab || tab == line)
		return -EBADMSG;
	size_t name_enc = (size_t)(tab - line);
	size_t node_hex = len - name_enc - 1;
	if (node_hex % 2 || node_hex == 0)
		return -EBADMSG;
	_cleanup_free_ char *name = malloc(name_enc + 1);
	_cleanup_free_ uint8_t *node_buf = malloc(node_hex / 2);
	if (!name || !node_buf)
		return -ENOMEM;
	size_t n = 0;
	for (size_t i = 0; i < name_enc; i++) {
		if (line[i] == '%') {
			if (i + 2 >= name_enc)
				return -EBADMSG;
			if (cas_hex_decode(line + i + 1, 1, name + n) < 0)
				return -EBADMSG;
			n++;
			i += 2;
		} else {
			name[n++] = line[i];
		}
	}
	name[n] = 0;
	if (strlen(name) != n || !cas_root_name_valid(name))
		return -EBADMSG;
	if (cas_hex_decode(tab + 1, node_hex / 2, node_buf) < 0)
		return -EBADMSG;
	cas_node node;
	int r = cas_node_decode(node_buf, node_hex / 2, &node, NULL);
	if (r < 0)
		return -EBADMSG;
	node.name = (const uint8_t *)name;
	node.name_len = n;
	return cb(userdata, name, &node);
}

int cas_roots_file_parse(const char *buf, size_t len, cas_root_cb cb,
			 void *userdata)
{
	size_t pos = 0;
	while (pos < len) {
		const char *nl = memchr(buf + pos, '\n', len - pos);
		size_t end = nl ? (size_t)(nl - buf) : len;
		size_t llen = end - pos;
		if (llen > 0 && buf[pos + llen - 1] == '\r')
			llen--;
		if (llen > 0 && buf[pos] != '#') {
			int r = parse_line(buf + pos, llen, cb, userdata);
			if (r < 0)
				return r;
		}
		pos = end + 1;
	}
	return 0;
}

size_t cas_layout_pack_offsets(const cas_directory *dir, uint64_t *off,
			       uint64_t *ret_len)
{
	size_t n = 0;
	for (size_t i = 0; i < dir->n_files; i++)
		n += dir->files[i].size > 0 &&
		     dir->files[i].size <= CAS_LAYOUT_PACK_MAX;
	if (n < CAS_LAYOUT_PACK_MIN)
		return 0;
	uint64_t pos = 0;
	for (size_t i = 0; i < dir->n_files; i++) {
		uint64_t size = dir->files[i].size;
		off[i] = size > 0 && size <= CAS_LAYOUT_PACK_MAX ? pos
								 : UINT64_MAX;
		if (off[i] != UINT64_MAX)
			pos += size;
	}
	*ret_len = pos;
	return n;
}

int cas_tree_file_split(const uint8_t *buf, size_t len, cas_fetch_dir_cb cb,
			void *userdata)
{
	const uint8_t *p = buf, *end = len ? buf + len : buf;
	while (p < end) {
		uint64_t n;
		int r = cas_varint_get(&p, end, &n);
		if (r < 0 || n > (uint64_t)(end - p))
			return -EBADMSG;
		r = cb(userdata, NULL, p, (size_t)n);
		if (r < 0)
			return r;
		p += n;
	}
	return 0;
}
