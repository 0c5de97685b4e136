#include "cli/json.h"

#include <inttypes.h>

/* Length of the valid UTF-8 sequence at buf (1-4), or 0 if the byte at buf
 * does not start one. Follows RFC 3629's table of well-formed sequences. */
static size_t utf8_seq(const uint8_t *buf, size_t len)
{
	uint8_t b = buf[0];
	size_t n;
	uint8_t lo = 0x80, hi = 0xbf;

	if (b < 0x80)
		return 1;
	if (b >= 0xc2 && b <= 0xdf)
		n = 2;
	else if (b >= 0xe0 && b <= 0xef) {
		n = 3;
		if (b == 0xe0)
			lo = 0xa0; /* no overlongs */
		else if (b == 0xed)
			hi = 0x9f; /* no surrogates */
	} else if (b >= 0xf0 && b <= 0xf4) {
		n = 4;
		if (b == 0xf0)
			lo = 0x90;
		else if (b == 0xf4)
			hi = 0x8f; /* nothing above U+10FFFF */
	} else
		return 0;
	if (len < n)
		return 0;
	if (buf[1] < lo || buf[1] > hi)
		return 0;
	for (size_t i = 2; i < n; i++)
		if (buf[i] < 0x80 || buf[i] > 0xbf)
			return 0;
	return n;
}

bool cas_json_utf8_valid(const uint8_t *buf, size_t len)
{
	size_t i = 0;
	while (i < len) {
		size_t n = utf8_seq(buf + i, len - i);
		if (!n)
			return false;
		i += n;
	}
	return true;
}

void cas_json_string(FILE *f, const uint8_t *buf, size_t len)
{
	size_t i = 0;

	fputc('"', f);
	while (i < len) {
		uint8_t b = buf[i];
		size_t n = utf8_seq(buf + i, len - i);
		if (!n) {
			fputs("\xef\xbf\xbd", f); /* U+FFFD */
			i++;
			continue;
		}
		if (n > 1) {
			fwrite(buf + i, 1, n, f);
			i += n;
			continue;
		}
		switch (b) {
		case '"':
			fputs("\\\"", f);
			break;
		case '\\':
			fputs("\\\\", f);
			break;
		case '\b':
			fputs("\\b", f);
			break;
		case '\f':
			fputs("\\f", f);
			break;
		case '\n':
			fputs("\\n", f);
			break;
		case '\r':
			fputs("\\r", f);
			break;
		case '\t':
			fputs("\\t", f);
			break;
		default:
			if (b < 0x20 || b == 0x7f)
				fprintf(f, "\\u%04x", b);
			else
				fputc(b, f);
		}
		i++;
	}
	fputc('"', f);
}

static void base64(FILE *f, const uint8_t *buf, size_t len)
{
	static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqr"
				  "stuvwxyz0123456789+/";
	size_t i;

	fputc('"', f);
	for (i = 0; i + 3 <= len; i += 3) {
		uint32_t v = (uint32_t)buf[i] << 16 |
			     (uint32_t)buf[i + 1] << 8 | buf[i + 2];
		fputc(tab[v >> 18], f);
		fputc(tab[(v >> 12) & 63], f);
		fputc(tab[(v >> 6) & 63], f);
		fputc(tab[v & 63], f);
	}
	if (len - i == 1) {
		uint32_t v = (uint32_t)buf[i] << 16;
		fputc(tab[v >> 18], f);
		fputc(tab[(v >> 12) & 63], f);
		fputs("==", f);
	} else if (len - i == 2) {
		uint32_t v = (uint32_t)buf[i] << 16 | (uint32_t)buf[i + 1] << 8;
		fputc(tab[v >> 18], f);
		fputc(tab[(v >> 12) & 63], f);
		fputc(tab[(v >> 6) & 63], f);
		fputc('=', f);
	}
	fputc('"', f);
}

void cas_json_bytes_field(FILE *f, const char *key, const uint8_t *buf,
			  size_t len)
{
	fprintf(f, "\"%s\":", key);
	cas_json_string(f, buf, len);
	if (!cas_json_utf8_valid(buf, len)) {
		fprintf(f, ",\"%s_base64\":", key);
		base64(f, buf, len);
	}
}

void cas_json_node(FILE *f, const cas_node *node, bool with_name)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];

	fputc('{', f);
	if (with_name) {
		cas_json_bytes_field(f, "name", node->name, node->name_len);
		fputc(',', f);
	}
	switch (node->type) {
	case CAS_NODE_DIRECTORY:
		cas_digest_to_hex(&node->digest, hex);
		fprintf(f,
			"\"type\":\"directory\",\"digest\":\"%s\",\"size\":"
			"%" PRIu64,
			hex, node->size);
		break;
	case CAS_NODE_FILE:
		cas_digest_to_hex(&node->digest, hex);
		fprintf(f,
			"\"type\":\"file\",\"digest\":\"%s\",\"size\":%" PRIu64
			",\"executable\":%s",
			hex, node->size, node->executable ? "true" : "false");
		break;
	case CAS_NODE_SYMLINK:
		fputs("\"type\":\"symlink\",", f);
		cas_json_bytes_field(f, "target", node->target,
				     node->target_len);
		break;
	}
	fputc('}', f);
}
