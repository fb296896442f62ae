/*
 * The busy-poll window is counted from when the replies are out, not from before the
 * flusher writes them.  Sending a reply can take a while (on a virtual machine, waking
 * the client's idle vCPU takes tens of microseconds inside send()); a window started
 * before the send loses that much, and a depth-1 client then finds the reactor asleep.
 * Here the in-memory transport's send takes 20 ms, twice the 10 ms window: after one
 * turn of the reactor's loop the window must still be open, ending 10 ms after the send.
 */
#include "build-config.h"

#include <ev.h>
#include <time.h>

#include "check.h"
#include "embed.h"
#include "server.h"

#define WINDOW 0.010 /* busy-poll: 10ms */

static ev_tstamp sent_at;

static void slow_send(void)
{
	struct timespec ts = {0, 20 * 1000 * 1000};

	nanosleep(&ts, NULL);
	sent_at = ev_time();
}

int main(void)
{
	struct nbdv_server *srv = embed_init("busy-poll: 10ms\n"
					     "exports:\n"
					     "  - name: mem\n    driver: memory\n    size: 1M\n");
	struct nbdv_reactor *r = &srv->reactors[0];
	struct embed_client *cl = embed_connect(64, 4096);

	CHECK(!cl->gone);
	CHECK(cl->out_len == 0); /* the greeting waits for the flusher */
	embed_on_send = slow_send;
	ev_run(r->loop, EVRUN_NOWAIT); /* one turn: the flusher writes the greeting */
	embed_on_send = NULL;
	CHECK(cl->out_len > 0 && sent_at > 0);
	/* Still polling, and until a whole window after the send. */
	CHECK(ev_is_active(&r->spin_idle));
	CHECK_MSG(r->spin_until >= sent_at + WINDOW, "window ends %.1f ms after the send",
		  (r->spin_until - sent_at) * 1e3);
	embed_close(cl);
	embed_fini();
	CHECKS_DONE("test-busy-poll");
}
