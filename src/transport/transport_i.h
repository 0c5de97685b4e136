/* transport_i.h - what the transports' own files share.
 *
 * Contract: functions only, thread-safe.
 */
#ifndef CAS_TRANSPORT_TRANSPORT_I_H
#define CAS_TRANSPORT_TRANSPORT_I_H

#include <pthread.h>

/* Joins a thread that may be blocked in a system call: sends it `sig`
 * (whose handler does nothing and which it does not block, so the call
 * returns EINTR) until it has ended. A signal may land just before the
 * thread blocks, hence the knocking. The caller has told it to stop. */
void cas_transport_knock_join(pthread_t thread, int sig);

#endif
