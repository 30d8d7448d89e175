"""The sweep on the embedded store, with a stand-in broker: which jobs it sends
again, and that it does not double a queue whose jobs are merely waiting."""

from datetime import timedelta

import pytest
from lmq.core.config import load_settings
from lmq.core.store import leases, queries, session_scope, sessions
from lmq.core.store.models import utcnow
from lmq.workers import sweep


class StandInBroker:
    """Records what is sent; `waiting` is how many messages its queue holds."""

    def __init__(self, waiting):
        self.waiting = waiting
        self.sent = []

    def send_task(self, name, args, queue):
        self.sent.append((queue, args[0]))


@pytest.fixture
def store(lmq_home, monkeypatch):
    settings = load_settings()
    broker = StandInBroker(waiting=0)
    monkeypatch.setattr(sweep, "messages_on", lambda app, queue: app.waiting)
    return settings, sessions(settings), broker


def queued_job(factory, sent_ago_s):
    with session_scope(factory) as session:
        job = queries.create_generate_job(session, preset="tiny", inputs=[{"prompt": "a"}], params={})
        job.enqueued_at = utcnow() - timedelta(seconds=sent_ago_s)
        return job.id


def test_queued_jobs_are_sent_again_only_when_their_queue_has_lost_messages(store):
    settings, factory, broker = store
    old = [queued_job(factory, sent_ago_s=60) for _ in range(3)]
    queued_job(factory, sent_ago_s=0)  # just sent: not a candidate yet
    broker.waiting = 3  # every message is still there: the jobs merely wait for a worker
    assert sweep.sweep(broker, settings) == []
    broker.waiting = 1  # two were lost; which ones cannot be told, so all three go again
    assert sorted(sweep.sweep(broker, settings)) == sorted(old)
    assert broker.sent and {queue for queue, _ in broker.sent} == {"lmq.generate"}
    broker.waiting = 0
    assert sweep.sweep(broker, settings) == []  # sent a moment ago


def test_a_job_whose_lease_expired_is_sent_again_once_whatever_its_queue_holds(store):
    settings, factory, broker = store
    job_id = queued_job(factory, sent_ago_s=60)
    with session_scope(factory) as session:
        leases.claim(session, job_id, "dead-worker", lease_s=0)
    broker.waiting = 10
    assert sweep.sweep(broker, settings) == [job_id]
    assert sweep.sweep(broker, settings) == []  # once per expiry, until LMQ_SWEEP_S has passed
    live = queued_job(factory, sent_ago_s=60)
    with session_scope(factory) as session:
        leases.claim(session, live, "live-worker", lease_s=30)
    assert sweep.sweep(broker, settings) == []  # a live lease: its worker has it
