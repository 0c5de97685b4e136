/* virtiofs_i.h - the device's request path without its socket, for the
 * fuzz target (fuzz/fuzz-virtiofs.c): a device as it is while a frontend
 * is connected (its session opened with cfg's session_open), and the
 * queue ops the vhost-user device calls with each chain, so that chains
 * built by the caller go through the same glue as a guest's.
 *
 * Contract: as virtiofs.h. cas_virtiofs_free closes the session. The ops
 * take the device as opaque; process wants a context from queue_start.
 */
#ifndef CAS_TRANSPORT_VIRTIOFS_I_H
#define CAS_TRANSPORT_VIRTIOFS_I_H

#include "transport/vhost_user.h"
#include "transport/virtiofs.h"

/* cfg->socket_path is not used. */
int cas_virtiofs_new_connected(const struct cas_virtiofs_config *cfg,
			       struct cas_virtiofs **ret);
const struct cas_vu_ops *cas_virtiofs_queue_ops(void);
/* Closes the session and opens a fresh one, as a frontend that
 * disconnects and connects again would see; the queues stay. */
void cas_virtiofs_session_reset(struct cas_virtiofs *v);

#endif
