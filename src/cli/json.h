/* json.h - the JSON the CLI prints (roots list --json, dir get --json).
 *
 * Names and symlink targets are bytes. Valid UTF-8 is printed as a JSON
 * string (quote, backslash and control characters escaped). Anything else
 * is printed with each byte that is not part of a valid UTF-8 sequence
 * replaced by U+FFFD, and the exact bytes are added under KEY_base64
 * (standard base64 with padding), so nothing is lost.
 *
 * Contract: writes to a stdio stream; single-threaded like the CLI.
 */
#ifndef CAS_CLI_JSON_H
#define CAS_CLI_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/directory.h"

/* True if buf is well-formed UTF-8 (no overlongs, surrogates or code
 * points above U+10FFFF). */
bool cas_json_utf8_valid(const uint8_t *buf, size_t len);

/* Writes a JSON string for bytes (invalid UTF-8 replaced by U+FFFD). */
void cas_json_string(FILE *f, const uint8_t *buf, size_t len);

/* Writes `"key":"..."` and, when the bytes are not valid UTF-8, also
 * `,"key_base64":"..."`. */
void cas_json_bytes_field(FILE *f, const char *key, const uint8_t *buf,
			  size_t len);

/* Writes one node as a JSON object: name (when with_name), type and, by
 * type, digest, size, executable, target. */
void cas_json_node(FILE *f, const cas_node *node, bool with_name);

#endif
