/* grpc_wire.c - gRPC framing, status codes and tvix castore request
 * decoding (grpc_i.h). Requests are decoded with protobuf-c from the
 * generated descriptors of tvix's protos; BlobChunk, which carries the
 * bulk of the bytes, is parsed in place to avoid a copy per chunk. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/varint.h"
#include "remote/grpc_i.h"
#include "rpc_blobstore.pb-c.h"
#include "rpc_directory.pb-c.h"

enum cas_grpc_status cas_grpc_status_from_errno(int r)
{
	switch (r) {
	case 0:
		return CAS_GRPC_OK;
	case -ENOENT:
		return CAS_GRPC_NOT_FOUND;
	case -EINVAL:
	case -EBADMSG:
		return CAS_GRPC_INVALID_ARGUMENT;
	case -EMSGSIZE:
	case -ENOSPC:
		return CAS_GRPC_RESOURCE_EXHAUSTED;
	case -EROFS:
		return CAS_GRPC_PERMISSION_DENIED;
	case -EPROTONOSUPPORT:
		return CAS_GRPC_UNIMPLEMENTED;
	default:
		return CAS_GRPC_INTERNAL;
	}
}

int cas_grpc_errno_from_status(int status)
{
	switch (status) {
	case CAS_GRPC_OK:
		return 0;
	case CAS_GRPC_NOT_FOUND:
		return -ENOENT;
	case CAS_GRPC_INVALID_ARGUMENT:
		return -EINVAL;
	default:
		return -EIO;
	}
}

void cas_grpc_frame_prefix(uint8_t out[5], size_t len)
{
	out[0] = 0;
	out[1] = (uint8_t)(len >> 24);
	out[2] = (uint8_t)(len >> 16);
	out[3] = (uint8_t)(len >> 8);
	out[4] = (uint8_t)len;
}

size_t cas_grpc_blob_chunk_header(uint8_t out[16], size_t data_len)
{
	if (data_len == 0) {
		/* proto3 omits empty bytes: the empty message. */
		cas_grpc_frame_prefix(out, 0);
		return 5;
	}
	size_t msg_len = 1 + cas_varint_len(data_len) + data_len;
	cas_grpc_frame_prefix(out, msg_len);
	out[5] = 0x0a; /* field 1, length-delimited */
	return (size_t)(cas_varint_put(out + 6, data_len) - out);
}

bool cas_grpc_reader_idle(const struct cas_grpc_reader *r)
{
	return r->prefix_len == 0 && !r->in_msg;
}

void cas_grpc_reader_release(struct cas_grpc_reader *r)
{
	free(r->msg);
	*r = (struct cas_grpc_reader){0};
}

/* Memory for a message gathered piece by piece: a peer announcing a
 * large message gets memory as its bytes arrive, not on the
 * announcement (the head, at most 11 bytes, always fits). */
static int gather_start(struct cas_grpc_reader *r)
{
	r->msg_cap = r->msg_len < 65536 ? r->msg_len : 65536;
	if (r->msg_cap < r->head_len)
		r->msg_cap = r->head_len;
	r->msg = malloc(r->msg_cap ? r->msg_cap : 1);
	return r->msg ? 0 : -ENOMEM;
}

/* A piece-wise message with bytes_cb, before its data: takes its first
 * bytes until they show whether it is a lone data field (then direct)
 * or not (then gathered, as any other). Returns what it took of buf
 * (all of it when that is not known yet), or -ENOMEM. */
static ssize_t reader_head(struct cas_grpc_reader *r, const uint8_t *buf,
			   size_t len)
{
	size_t took = 0;
	bool lone = false, other = false;
	while (!lone && !other && took < len) {
		r->head[r->head_len++] = buf[took++];
		r->msg_got++;
		const uint8_t *p = r->head + 1;
		uint64_t v = 0;
		int vr =
			r->head_len < 2
				? -EBADMSG
				: cas_varint_get(&p, r->head + r->head_len, &v);
		if (r->head[0] != 0x0a) /* field 1, length-delimited */
			other = true;
		else if (vr == 0)
			lone = v == r->msg_len - r->msg_got;
		else if (vr != -EBADMSG)
			other = true;
		/* Its length goes on, unless the message or the room ends. */
		if (!lone && (r->msg_got == r->msg_len ||
			      r->head_len == sizeof(r->head) || vr == 0))
			other = true;
	}
	if (lone) {
		r->direct = true;
		return (ssize_t)took;
	}
	if (!other)
		return (ssize_t)took; /* not known yet */
	if (gather_start(r) < 0)
		return -ENOMEM;
	memcpy(r->msg, r->head, r->head_len);
	return (ssize_t)took;
}

int cas_grpc_reader_feed(struct cas_grpc_reader *r, const uint8_t *buf,
			 size_t len, cas_grpc_msg_cb cb, void *userdata)
{
	while (len > 0 || (r->in_msg && r->msg_got == r->msg_len)) {
		if (!r->in_msg) {
			size_t take = 5 - r->prefix_len;
			if (take > len)
				take = len;
			memcpy(r->prefix + r->prefix_len, buf, take);
			r->prefix_len += take;
			buf += take;
			len -= take;
			if (r->prefix_len < 5)
				return 0;
			if (r->prefix[0] != 0)
				return -EPROTONOSUPPORT;
			uint32_t mlen = (uint32_t)r->prefix[1] << 24 |
					(uint32_t)r->prefix[2] << 16 |
					(uint32_t)r->prefix[3] << 8 |
					r->prefix[4];
			if (mlen > CAS_GRPC_MAX_MESSAGE)
				return -EMSGSIZE;
			r->prefix_len = 0;
			r->in_msg = true;
			r->msg_len = mlen;
			r->msg_got = 0;
			free(r->msg);
			r->msg = NULL;
			/* A whole message in the input: no copy. */
			if (len >= mlen) {
				r->in_msg = false;
				int cr = cb(userdata, buf, mlen);
				if (cr < 0)
					return cr;
				buf += mlen;
				len -= mlen;
				continue;
			}
			r->head_len = 0;
			r->direct = false;
			if (!r->bytes_cb && gather_start(r) < 0)
				return -ENOMEM;
		}
		if (!r->msg && !r->direct) {
			ssize_t took = reader_head(r, buf, len);
			if (took < 0)
				return (int)took;
			buf += took;
			len -= (size_t)took;
			if (!r->msg && !r->direct)
				return 0; /* its head goes on in the next piece */
		}
		size_t take = r->msg_len - r->msg_got;
		if (take > len)
			take = len;
		int cr = 0;
		if (r->direct && take > 0)
			cr = r->bytes_cb(userdata, buf, take);
		else if (!r->direct && r->msg_got + take > r->msg_cap) {
			size_t cap = r->msg_cap * 2;
			if (cap < r->msg_got + take)
				cap = r->msg_got + take;
			if (cap > r->msg_len)
				cap = r->msg_len;
			uint8_t *n = realloc(r->msg, cap);
			if (!n)
				return -ENOMEM;
			r->msg = n;
			r->msg_cap = cap;
		}
		if (cr < 0)
			return cr;
		if (!r->direct)
			memcpy(r->msg + r->msg_got, buf, take);
		r->msg_got += take;
		buf += take;
		len -= take;
		if (r->msg_got < r->msg_len)
			return 0;
		r->in_msg = false;
		if (r->direct) {
			r->direct = false;
			continue;
		}
		cr = cb(userdata, r->msg, r->msg_len);
		free(r->msg);
		r->msg = NULL;
		if (cr < 0)
			return cr;
	}
	return 0;
}

/* The service and method part of each path; the package comes before. */
static const struct {
	const char *name;
	enum cas_grpc_method method;
} methods[] = {
	{"BlobService/Stat", CAS_GRPC_BLOB_STAT},
	{"BlobService/Read", CAS_GRPC_BLOB_READ},
	{"BlobService/Put", CAS_GRPC_BLOB_PUT},
	{"DirectoryService/Get", CAS_GRPC_DIRECTORY_GET},
	{"DirectoryService/Put", CAS_GRPC_DIRECTORY_PUT},
	{"BlobStoreService/StatBlob", CAS_GRPC_BS_STAT_BLOB},
	{"BlobStoreService/GetBlob", CAS_GRPC_BS_GET_BLOB},
	{"BlobStoreService/PutBlob", CAS_GRPC_BS_PUT_BLOB},
	{"ChunkStoreService/StatChunk", CAS_GRPC_BLOB_STAT},
	{"ChunkStoreService/GetChunk", CAS_GRPC_BLOB_READ},
	{"ChunkStoreService/PutChunk", CAS_GRPC_BLOB_PUT},
};

static const char *const packages[] = {
	[CAS_GRPC_SNIX] = "snix.castore.v1",
	[CAS_GRPC_TVIX] = "tvix.castore.v1",
};

enum cas_grpc_method cas_grpc_method_from_path(const char *path, size_t len)
{
	/* "/" PACKAGE "." SERVICE "/" METHOD, either package. */
	size_t pl = strlen(packages[CAS_GRPC_SNIX]);
	if (len < pl + 2 || path[0] != '/' || path[pl + 1] != '.' ||
	    (memcmp(path + 1, packages[CAS_GRPC_SNIX], pl) != 0 &&
	     memcmp(path + 1, packages[CAS_GRPC_TVIX], pl) != 0))
		return CAS_GRPC_UNKNOWN_METHOD;
	path += pl + 2;
	len -= pl + 2;
	for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
		if (strlen(methods[i].name) == len &&
		    memcmp(methods[i].name, path, len) == 0)
			return methods[i].method;
	return CAS_GRPC_UNKNOWN_METHOD;
}

const char *cas_grpc_method_path(enum cas_grpc_method m,
				 enum cas_grpc_package pkg, char *buf,
				 size_t size)
{
	for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
		if (methods[i].method == m) {
			snprintf(buf, size, "/%s.%s", packages[pkg],
				 methods[i].name);
			return buf;
		}
	snprintf(buf, size, "/");
	return buf;
}

static int take_digest(const ProtobufCBinaryData *b, cas_digest *ret,
		       const char **ret_why)
{
	if (b->len != CAS_DIGEST_LEN) {
		*ret_why = "digest is not 32 bytes";
		return -EINVAL;
	}
	memcpy(ret->bytes, b->data, CAS_DIGEST_LEN);
	return 0;
}

int cas_grpc_decode_stat(const uint8_t *msg, size_t len, cas_digest *ret,
			 const char **ret_why)
{
	Tvix__Castore__V1__StatBlobRequest *m =
		tvix__castore__v1__stat_blob_request__unpack(NULL, len, msg);
	if (!m) {
		*ret_why = "malformed StatBlobRequest";
		return -EINVAL;
	}
	int r = take_digest(&m->digest, ret, ret_why);
	tvix__castore__v1__stat_blob_request__free_unpacked(m, NULL);
	return r;
}

int cas_grpc_decode_read(const uint8_t *msg, size_t len, cas_digest *ret,
			 const char **ret_why)
{
	Tvix__Castore__V1__ReadBlobRequest *m =
		tvix__castore__v1__read_blob_request__unpack(NULL, len, msg);
	if (!m) {
		*ret_why = "malformed ReadBlobRequest";
		return -EINVAL;
	}
	int r = take_digest(&m->digest, ret, ret_why);
	tvix__castore__v1__read_blob_request__free_unpacked(m, NULL);
	return r;
}

int cas_grpc_decode_get(const uint8_t *msg, size_t len, cas_digest *ret,
			bool *ret_recursive, const char **ret_why)
{
	Tvix__Castore__V1__GetDirectoryRequest *m =
		tvix__castore__v1__get_directory_request__unpack(NULL, len,
								 msg);
	int r;
	if (!m) {
		*ret_why = "malformed GetDirectoryRequest";
		return -EINVAL;
	}
	if (m->by_what_case !=
	    TVIX__CASTORE__V1__GET_DIRECTORY_REQUEST__BY_WHAT_DIGEST) {
		*ret_why = "no digest given";
		r = -EINVAL;
	} else {
		r = take_digest(&m->digest, ret, ret_why);
		*ret_recursive = m->recursive;
	}
	tvix__castore__v1__get_directory_request__free_unpacked(m, NULL);
	return r;
}

int cas_grpc_decode_blob_chunk(const uint8_t *msg, size_t len,
			       const uint8_t **ret_data, size_t *ret_len,
			       const char **ret_why)
{
	const uint8_t *p = msg, *end = msg + len;
	*ret_data = msg;
	*ret_len = 0;
	*ret_why = "malformed BlobChunk";
	while (p < end) {
		uint64_t tag, v;
		if (cas_varint_get(&p, end, &tag) < 0 || (tag >> 3) == 0)
			return -EINVAL;
		switch (tag & 7) {
		case 0:
			if (cas_varint_get(&p, end, &v) < 0)
				return -EINVAL;
			break;
		case 1:
			if (end - p < 8)
				return -EINVAL;
			p += 8;
			break;
		case 2:
			if (cas_varint_get(&p, end, &v) < 0 ||
			    v > (uint64_t)(end - p))
				return -EINVAL;
			if (tag >> 3 == 1) { /* data; the last one wins */
				*ret_data = p;
				*ret_len = (size_t)v;
			}
			p += v;
			break;
		case 5:
			if (end - p < 4)
				return -EINVAL;
			p += 4;
			break;
		default:
			return -EINVAL;
		}
		if (tag >> 3 == 1 && (tag & 7) != 2)
			return -EINVAL;
	}
	return 0;
}

int cas_grpc_decode_digest_response(const uint8_t *msg, size_t len,
				    bool directory, cas_digest *ret)
{
	const char *why;
	int r;
	if (directory) {
		Tvix__Castore__V1__PutDirectoryResponse *m =
			tvix__castore__v1__put_directory_response__unpack(
				NULL, len, msg);
		if (!m)
			return -EBADMSG;
		r = take_digest(&m->root_digest, ret, &why);
		tvix__castore__v1__put_directory_response__free_unpacked(m,
									 NULL);
	} else {
		Tvix__Castore__V1__PutBlobResponse *m =
			tvix__castore__v1__put_blob_response__unpack(NULL, len,
								     msg);
		if (!m)
			return -EBADMSG;
		r = take_digest(&m->digest, ret, &why);
		tvix__castore__v1__put_blob_response__free_unpacked(m, NULL);
	}
	return r < 0 ? -EBADMSG : 0;
}

int cas_grpc_encode_digest_msg(int kind, const cas_digest *d, bool recursive,
			       uint8_t **ret, size_t *ret_len)
{
	/* Each is field 1 = digest, and for Get field 2 = recursive:
	 * StatBlobRequest, ReadBlobRequest, GetDirectoryRequest (oneof
	 * by_what.digest = 1), PutBlobResponse, PutDirectoryResponse.
	 * StatBlobResponse is empty. */
	size_t body = 0;
	if (kind != CAS_GRPC_MSG_STAT_RESPONSE)
		body = 2 + CAS_DIGEST_LEN;
	if (kind == CAS_GRPC_MSG_GET_REQUEST && recursive)
		body += 2;
	uint8_t *buf = malloc(5 + body);
	if (!buf)
		return -ENOMEM;
	cas_grpc_frame_prefix(buf, body);
	if (body) {
		buf[5] = 0x0a;
		buf[6] = CAS_DIGEST_LEN;
		memcpy(buf + 7, d->bytes, CAS_DIGEST_LEN);
	}
	if (kind == CAS_GRPC_MSG_GET_REQUEST && recursive) {
		buf[7 + CAS_DIGEST_LEN] = 0x10;
		buf[8 + CAS_DIGEST_LEN] = 1;
	}
	*ret = buf;
	*ret_len = 5 + body;
	return 0;
}

void cas_grpc_percent_encode(const char *in, char *out, size_t size)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t o = 0;
	if (size == 0)
		return;
	for (const unsigned char *p = (const unsigned char *)in; *p; p++) {
		if (*p >= 0x20 && *p <= 0x7e && *p != '%') {
			if (o + 1 >= size)
				break;
			out[o++] = (char)*p;
		} else {
			if (o + 3 >= size)
				break;
			out[o++] = '%';
			out[o++] = hex[*p >> 4];
			out[o++] = hex[*p & 15];
		}
	}
	out[o] = 0;
}
