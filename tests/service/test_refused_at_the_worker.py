"""A job the worker refuses for a bad value (here, a preset whose declared sizes cannot fit, which
a job may name when it was registered after the API checked it) fails with that value named, and
the worker logs it in one line: a refusal is not a bug, so no traceback."""

import logging

from hostile_presets import HOSTILE_PRESETS, make_hostile_preset

from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions
from lmq.workers.runner import JobRunner, pool_from_settings


def test_a_refused_preset_fails_its_job_in_one_log_line(lmq_home, tmp_path, caplog):
    name = "huge-vocabulary"
    preset = make_hostile_preset(tmp_path / name, name)
    settings = load_settings()
    with session_scope(sessions(settings)) as session:
        job_id = queries.create_generate_job(session, preset=str(preset), inputs=[{"prompt": "Hi"}], params={}).id
    with caplog.at_level(logging.INFO, logger="lmq.workers"):
        assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "failed"
    with session_scope(sessions(settings)) as session:
        error = queries.get_job(session, job_id).error
    assert HOSTILE_PRESETS[name][2] in error and "LMQ_MODEL_MEMORY_GB" in error, error
    failures = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert failures and all(record.exc_info is None for record in failures), failures
    assert HOSTILE_PRESETS[name][2] in failures[0].getMessage()
