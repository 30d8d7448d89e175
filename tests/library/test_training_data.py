"""Training on a chat's answers alone (lmq.core.models.training_data): which tokens carry weight,
and the loss `evaluate` and `fit` report with those weights, against a masked cross-entropy
computed by hand from the model's logits."""

import shutil

import keras
import numpy as np
import pytest
import torch

from lmq.core.chat import chat_token_ids
from lmq.core.chat_templates import read_builtin_template
from lmq.core.models import CausalLM
from lmq.core.models.training_data import chat_example, completion_example

CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What does it return?"},
    {"role": "assistant", "content": "Return the value."},
    {"role": "user", "content": "And on error?"},
    {"role": "assistant", "content": "Raise an error.", "weight": 0},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Close the file."},
]


@pytest.fixture(scope="module")
def chat_lm(tiny_llama_preset, tmp_path_factory):
    """The tiny Llama with Llama 2's chat template, room for 256 tokens, and a loss averaged over
    the weighted tokens (what a fit job compiles)."""
    directory = tmp_path_factory.mktemp("chat") / "preset"
    shutil.copytree(tiny_llama_preset, directory)
    (directory / "chat_template.jinja").write_text(read_builtin_template("llama2_chat"))
    lm = CausalLM.from_preset(str(directory))
    lm.preprocessor.sequence_length = 256
    lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return lm


def trained_spans(weights):
    spans, start = [], None
    for position, weight in enumerate([*weights, 0]):
        if weight and start is None:
            start = position
        elif not weight and start is not None:
            spans.append((start, position))
            start = None
    return spans


def test_the_answers_with_weight_are_trained_and_nothing_else(chat_lm):
    tokenizer = chat_lm.preprocessor.tokenizer
    ids, weights = chat_example(tokenizer, CHAT)
    assert ids == chat_token_ids(tokenizer, [{k: v for k, v in m.items() if k != "weight"} for m in CHAT], False)
    spans = trained_spans(weights)
    # Two answers (the one of weight 0 is left out), each ending with the end token Llama 2's template closes it with.
    assert [tokenizer.detokenize(ids[start:end]).strip() for start, end in spans] == ["Return the value.", "Close the file."]
    assert [ids[end - 1] for _, end in spans] == [tokenizer.end_token_id] * 2
    # What comes before an answer is the prompt the model answers at inference.
    assert ids[: spans[0][0]] == chat_token_ids(tokenizer, CHAT[:2])
    assert ids[: spans[1][0]] == chat_token_ids(tokenizer, [{k: v for k, v in m.items() if k != "weight"} for m in CHAT[:6]])


def test_a_completion_is_trained_and_its_prompt_is_not(chat_lm):
    preprocessor = chat_lm.preprocessor
    ids, weights = completion_example(preprocessor, "Return the", " value of the key.")
    (start, end), = trained_spans(weights)
    assert ids[0] == preprocessor.tokenizer.start_token_id and ids[-1] == preprocessor.tokenizer.end_token_id
    assert end == len(ids)
    assert preprocessor.tokenizer.detokenize(ids[1:start]) == "Return the"
    assert preprocessor.tokenizer.detokenize(ids[start:-1]) == "value of the key."


def masked_cross_entropy(lm, rows):
    """By hand: each row's logits alone, the cross-entropy and the argmax of each next token, over
    the tokens of weight 1 only."""
    total, correct, count = 0.0, 0, 0
    for ids, weights in rows:
        logits = lm.score(np.array([ids]))[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(len(ids) - 1):
            if weights[position + 1]:
                target = ids[position + 1]
                total -= log_probs[position, target].item()
                correct += int(logits[position].argmax().item() == target)
                count += 1
    return total / count, correct / count


def test_the_loss_is_the_cross_entropy_of_the_trained_tokens_alone(chat_lm):
    rows = [chat_example(chat_lm.preprocessor.tokenizer, CHAT), completion_example(chat_lm.preprocessor, "Return the", " value.")]
    ids, weights = (list(column) for column in zip(*rows))
    loss, accuracy = chat_lm.evaluate(x=ids, sample_weight=weights, batch_size=2, verbose=0)
    expected_loss, expected_accuracy = masked_cross_entropy(chat_lm, rows)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy)
    # Unweighted, the loss is another number: the prompts' tokens would count.
    unweighted, _ = chat_lm.evaluate(x=ids, batch_size=2, verbose=0)
    assert abs(unweighted - loss) > 1e-3


def test_fit_reports_the_same_loss_before_its_first_update(chat_lm):
    rows = [chat_example(chat_lm.preprocessor.tokenizer, CHAT)]
    expected, _ = masked_cross_entropy(chat_lm, rows)
    ids, weights = [rows[0][0]], [rows[0][1]]
    chat_lm.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
    )
    history = chat_lm.fit(x=ids, sample_weight=weights, batch_size=1, epochs=1, verbose=0, validation_data=(ids, None, weights))
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert history.history["val_loss"][0] == pytest.approx(expected, rel=1e-5)


def test_weights_that_do_not_match_the_rows_are_refused(chat_lm):
    with pytest.raises(ValueError, match=r"sample_weight\[0\] has 2 weights for 3 token ids"):
        chat_lm.preprocessor([[1, 5, 6]], sample_weight=[[1, 1]])
    with pytest.raises(ValueError, match="only with rows of token ids"):
        chat_lm.preprocessor(["a text"], sample_weight=[[1]])
