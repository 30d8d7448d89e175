"""Training examples whose loss falls on some of their tokens: a chat's assistant turns, a completion
after its prompt. Each becomes token ids and one weight per token, which ``CausalLM.fit`` takes
(``fit(x=ids, sample_weight=weights)``) and its preprocessor packs: a weight says how much
predicting that token counts, so the loss is the cross-entropy of the weighted tokens alone.

A trained span is found as the tokens where the whole example leaves its prompt: a chat's
assistant turn is what follows the chat before it rendered with the generation prompt (the
prompt the model answers at inference), up to the end of that turn as the template closes it (its
end-of-turn token included, so the model learns to stop). Counting by common prefix keeps this
well defined for any tokenizer: a token that merges the end of a prompt with the start of its
answer is trained.
"""

from lmq.core.chat import chat_token_ids

TRAINED, NOT_TRAINED = 1.0, 0.0


def chat_example(tokenizer, messages):
    """(ids, weights) of a chat ([{"role", "content", "weight"?}, ...]): weight 1 on the tokens of
    each assistant turn whose ``weight`` is not 0 (OpenAI's per-message weight), 0 elsewhere. A
    chat its template refuses is a ``ChatTemplateError`` naming the message."""
    plain = [{key: value for key, value in message.items() if key != "weight"} for message in messages]
    ids = chat_token_ids(tokenizer, plain, add_generation_prompt=False)
    weights = [NOT_TRAINED] * len(ids)
    for index, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        start = _common_prefix(ids, chat_token_ids(tokenizer, plain[:index])) if index else 0
        end = _common_prefix(ids, chat_token_ids(tokenizer, plain[: index + 1], add_generation_prompt=False))
        weights[start:end] = [TRAINED] * (end - start)
    return ids, weights


def completion_example(preprocessor, prompt, completion):
    """(ids, weights) of a prompt and its completion, packed as a text is (start token, end token):
    weight 1 on the completion's tokens and the end token, 0 on the prompt's."""
    tokenizer = preprocessor.tokenizer
    start = [tokenizer.start_token_id] if preprocessor.add_start_token else []
    end = [tokenizer.end_token_id] if preprocessor.add_end_token else []
    ids = start + tokenizer.tokenize(prompt + completion) + end
    prompt_length = _common_prefix(ids, start + tokenizer.tokenize(prompt))
    return ids, [NOT_TRAINED] * prompt_length + [TRAINED] * (len(ids) - prompt_length)


def text_example(preprocessor, text):
    """(ids, weights) of a plain text, packed as ``fit`` packs strings: every token counts."""
    tokenizer = preprocessor.tokenizer
    start = [tokenizer.start_token_id] if preprocessor.add_start_token else []
    end = [tokenizer.end_token_id] if preprocessor.add_end_token else []
    ids = start + tokenizer.tokenize(text) + end
    return ids, [TRAINED] * len(ids)


def row_example(preprocessor, row):
    """(ids, weights) of a fit job's training row: a chat (``messages``), a ``prompt`` and its
    ``completion``, or a ``text``."""
    if "messages" in row:
        return chat_example(preprocessor.tokenizer, row["messages"])
    if "prompt" in row:
        return completion_example(preprocessor, row["prompt"], row["completion"])
    return text_example(preprocessor, row["text"])


def _common_prefix(ids, prefix):
    length = 0
    for token, other in zip(ids, prefix):
        if token != other:
            break
        length += 1
    return length
