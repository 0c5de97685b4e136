/* grpc_tls.c - TLS under the gRPC client for grpc+https:// (grpc_i.h),
 * with OpenSSL.
 *
 * The server is checked against the system's CAs (or $SSL_CERT_FILE /
 * $SSL_CERT_DIR, which OpenSSL reads) and the host name of the URL; HTTP/2
 * is asked for with ALPN and required. A client certificate, for a proxy
 * that checks them (docs/remote.md, "Exposing serve"), comes from
 * $CASTORE_TLS_CERT and $CASTORE_TLS_KEY (PEM files).
 *
 * The socket is non-blocking under TLS: reads return -EAGAIN when no
 * whole record is there (so a session ticket alone never blocks a
 * reader), writes wait with poll.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"

#define TLS_STALL_MS 60000

struct cas_grpc_tls_ctx {
	SSL_CTX *ctx;
};

struct cas_grpc_tls {
	SSL *ssl;
	int fd;
};

static const char *tls_error(void)
{
	unsigned long e = ERR_get_error();
	const char *why = e ? ERR_reason_error_string(e) : NULL;
	ERR_clear_error();
	return why ? why : "TLS failure";
}

int cas_grpc_tls_ctx_new(const char *url, struct cas_grpc_tls_ctx **ret)
{
	static const unsigned char alpn[] = "\x02h2";
	struct cas_grpc_tls_ctx *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->ctx = SSL_CTX_new(TLS_client_method());
	if (!t->ctx) {
		free(t);
		return -ENOMEM;
	}
	SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
	SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
	int r = 0;
	const char *cert = getenv("CASTORE_TLS_CERT");
	const char *key = getenv("CASTORE_TLS_KEY");
	if (SSL_CTX_set_default_verify_paths(t->ctx) != 1 ||
	    SSL_CTX_set_alpn_protos(t->ctx, alpn, sizeof(alpn) - 1) != 0)
		r = cas_log_errno(-EIO, "%s: TLS setup: %s", url, tls_error());
	else if (cert && *cert &&
		 SSL_CTX_use_certificate_chain_file(t->ctx, cert) != 1)
		r = cas_log_errno(-EINVAL, "%s: CASTORE_TLS_CERT %s: %s", url,
				  cert, tls_error());
	else if (cert && *cert &&
		 SSL_CTX_use_PrivateKey_file(t->ctx, key && *key ? key : cert,
					     SSL_FILETYPE_PEM) != 1)
		r = cas_log_errno(-EINVAL, "%s: CASTORE_TLS_KEY %s: %s", url,
				  key && *key ? key : cert, tls_error());
	if (r < 0) {
		cas_grpc_tls_ctx_free(t);
		return r;
	}
	*ret = t;
	return 0;
}

void cas_grpc_tls_ctx_free(struct cas_grpc_tls_ctx *t)
{
	if (!t)
		return;
	SSL_CTX_free(t->ctx);
	free(t);
}

/* Waits until fd is ready for what OpenSSL asked (err is SSL_get_error's
 * answer); -ETIMEDOUT after TLS_STALL_MS, -EIO for any other error. */
static int tls_wait(struct cas_grpc_tls *t, int err)
{
	short ev;
	if (err == SSL_ERROR_WANT_READ)
		ev = POLLIN;
	else if (err == SSL_ERROR_WANT_WRITE)
		ev = POLLOUT;
	else
		return -EIO;
	struct pollfd p = {t->fd, ev, 0};
	for (;;) {
		int pr = poll(&p, 1, TLS_STALL_MS);
		if (pr < 0 && errno == EINTR)
			continue;
		if (pr < 0)
			return cas_negerrno();
		return pr == 0 ? -ETIMEDOUT : 0;
	}
}

int cas_grpc_tls_connect(struct cas_grpc_tls_ctx *ctx, int fd, const char *url,
			 const char *host, struct cas_grpc_tls **ret)
{
	struct cas_grpc_tls *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->fd = fd;
	t->ssl = SSL_new(ctx->ctx);
	int flags = fcntl(fd, F_GETFL);
	if (!t->ssl || flags < 0 ||
	    fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ||
	    SSL_set_fd(t->ssl, fd) != 1 ||
	    SSL_set_tlsext_host_name(t->ssl, host) != 1 ||
	    SSL_set1_host(t->ssl, host) != 1) {
		cas_grpc_tls_free(t);
		return cas_log_errno(-EIO, "%s: TLS setup: %s", url,
				     tls_error());
	}
	for (;;) {
		int n = SSL_connect(t->ssl);
		if (n == 1)
			break;
		int err = SSL_get_error(t->ssl, n);
		int r = tls_wait(t, err);
		if (r == 0)
			continue;
		long v = SSL_get_verify_result(t->ssl);
		const char *why = v != X509_V_OK
					  ? X509_verify_cert_error_string(v)
				  : r == -ETIMEDOUT ? "handshake timed out"
						    : tls_error();
		cas_grpc_tls_free(t);
		return cas_log_errno(-EIO, "%s: TLS handshake: %s", url, why);
	}
	const unsigned char *proto;
	unsigned proto_len;
	SSL_get0_alpn_selected(t->ssl, &proto, &proto_len);
	if (proto_len != 2 || memcmp(proto, "h2", 2) != 0) {
		cas_grpc_tls_free(t);
		return cas_log_errno(-EPROTO,
				     "%s: the server does not offer "
				     "HTTP/2 over TLS (ALPN h2)",
				     url);
	}
	*ret = t;
	return 0;
}

void cas_grpc_tls_free(struct cas_grpc_tls *t)
{
	if (!t)
		return;
	SSL_free(t->ssl);
	free(t);
}

ssize_t cas_grpc_tls_read(struct cas_grpc_tls *t, void *buf, size_t len)
{
	size_t got = 0;
	int n = SSL_read_ex(t->ssl, buf, len, &got);
	if (n == 1)
		return (ssize_t)got;
	int err = SSL_get_error(t->ssl, n);
	ERR_clear_error();
	if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
		return -EAGAIN;
	if (err == SSL_ERROR_ZERO_RETURN)
		return 0;
	return -ECONNRESET;
}

bool cas_grpc_tls_pending(struct cas_grpc_tls *t)
{
	return SSL_pending(t->ssl) > 0;
}

int cas_grpc_tls_write_all(struct cas_grpc_tls *t, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	while (len > 0) {
		size_t done = 0;
		int n = SSL_write_ex(t->ssl, p, len, &done);
		if (n == 1) {
			p += done;
			len -= done;
			continue;
		}
		int r = tls_wait(t, SSL_get_error(t->ssl, n));
		ERR_clear_error();
		if (r < 0)
			return r == -EIO ? -ECONNRESET : r;
	}
	return 0;
}
