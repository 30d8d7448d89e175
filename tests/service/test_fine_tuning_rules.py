"""The fine-tuning API's rules (lmq.core.domain.fine_tuning) and the pause of a fit job in the
store: OpenAI's "auto" hyperparameters, the fine-tuned model's name, and a paused job that no
worker claims and no sweep sends until it is resumed."""

from datetime import timedelta

import pytest

from lmq.core.config import Limits, load_settings
from lmq.core.domain.fine_tuning import check_training_line, fine_tuned_model_name, fit_hyperparameters
from lmq.core.domain.jobs import create_fit_job
from lmq.core.names import JobState, is_preset_name
from lmq.core.store import leases, queries, session_scope, sessions
from lmq.core.store.models import utcnow


def test_auto_hyperparameters_are_three_epochs_batches_of_up_to_eight_and_the_fit_learning_rate():
    assert fit_hyperparameters({}, examples=100) == {"epochs": 3, "batch_size": 8, "learning_rate": 2e-5}
    assert fit_hyperparameters({"n_epochs": "auto", "batch_size": "auto"}, examples=5)["batch_size"] == 5
    given = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "lora_rank": 8}
    assert fit_hyperparameters(given, examples=100) == {"epochs": 2, "batch_size": 4, "learning_rate": 1e-5, "lora_rank": 8}


@pytest.mark.parametrize(
    ("base", "suffix", "expected"),
    [
        ("tiny-chat", "demo", "ft:tiny-chat:demo:0123abcd"),
        ("/srv/presets/stdlib-tiny-llama/", None, "ft:stdlib-tiny-llama::0123abcd"),
        ("hf://org/Some Model@v1", "x", "ft:Some-Model-v1:x:0123abcd"),
        ("ft:tiny-chat:demo:99999999", "again", "ft:ft-tiny-chat-demo-99999999:again:0123abcd"),
    ],
)
def test_a_fine_tuned_model_is_named_ft_base_suffix_id_and_that_is_a_store_name(base, suffix, expected):
    name = fine_tuned_model_name(base, suffix, "0123abcd" + "f" * 24)
    assert name == expected and is_preset_name(name)


def test_a_line_is_a_chat_a_completion_or_a_text_and_its_problem_names_the_line():
    limits = Limits()
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}]}
    assert check_training_line(chat, 1, limits) == chat
    assert check_training_line({"prompt": "", "completion": "x"}, 2, limits) == {"prompt": "", "completion": "x"}
    refused = {
        "line 3: messages[1]: only an assistant message has a 'weight'": {
            "messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b", "weight": 1}]
        },
        "line 3: messages[0].content: must be a string, got list": {
            "messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]
        },
        "line 3: tools: Extra inputs are not permitted": {
            "messages": [{"role": "assistant", "content": "a"}], "tools": []
        },
        "line 3: completion: Field required": {"prompt": "a"},
        "line 3: expected a JSON object, got str": "text",
    }
    for message, line in refused.items():
        with pytest.raises(ValueError) as error:
            check_training_line(line, 3, limits)
        assert str(error.value) == message


def test_a_paused_fit_job_holds_no_worker_and_is_sent_again_only_once_resumed(lmq_home):
    store = sessions(load_settings())
    with session_scope(store) as session:
        job_id = create_fit_job(
            session, training_data=[{"text": "a"}], validation_data=None, hyperparameters={}, preset="tiny"
        ).id
        leases.claim(session, job_id, "worker-1", lease_s=30)
        queries.request_pause(session, job_id)
        assert queries.job_state(session, job_id) == JobState.pausing.value
    with session_scope(store) as session:  # its worker stops at the next step
        job = queries.get_job(session, job_id)
        queries.pause(session, job)
    later = utcnow() + timedelta(minutes=5)
    with session_scope(store) as session:
        assert leases.claim(session, job_id, "worker-2", lease_s=30) is None
        assert job_id not in [w.id for w in leases.waiting_for_a_worker(session, later, sent_before=later)]
        queries.request_resume(session, job_id)
        assert queries.job_state(session, job_id) == JobState.queued.value
        assert job_id in [w.id for w in leases.waiting_for_a_worker(session, later, sent_before=later)]
        assert leases.claim(session, job_id, "worker-2", lease_s=30).attempts == 2
    with session_scope(store) as session:
        queries.request_pause(session, job_id)
        queries.request_cancel(session, job_id)  # a job pausing is cancelled as a running one
        assert queries.job_state(session, job_id) == JobState.cancelling.value
