"""Fine-tuning files are checked line by line when uploaded, and against their job's backbone and each other
when the job is validated: formats, limits, line numbers."""

import json

import pytest

from adapters.errors import TrainingFileError
from adapters.store.job_data import (
    ChatExample,
    LabelledText,
    PromptCompletion,
    check_fits_task,
    check_job_files,
    check_labels,
    parse_training_file,
)
from adapters.store.job_records import FineTuningConfig

LIMITS = FineTuningConfig(reported_errors=2)


def jsonl(*records) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode() + b"\n"


def chat(answer: str, weight: int = 1) -> dict:
    return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": answer, "weight": weight},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": answer}]}


def test_chat_file_parses_with_the_trained_turns():
    parsed = parse_training_file(jsonl(chat("hello", weight=0), chat("yo")), LIMITS)
    assert parsed.format == "chat" and len(parsed.examples) == 2
    first = parsed.examples[0]
    assert isinstance(first, ChatExample) and first.trained == (False, False, False, False, True)


def test_prompt_completion_and_labelled_files():
    pc = parse_training_file(jsonl({"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}), LIMITS)
    assert pc.format == "prompt_completion" and pc.examples[1] == PromptCompletion("c", "d")
    labelled = parse_training_file(jsonl({"text": "good", "label": 1}, {"text": "bad", "label": 0.0}), LIMITS)
    assert labelled.format == "text_label" and labelled.labels == ["0", "1"]
    pairs = parse_training_file(jsonl({"text": "a", "text_pair": "b", "label": "yes"},
                                      {"text": "c", "text_pair": "d", "label": "no"}), LIMITS)
    assert pairs.format == "text_pair_label" and pairs.examples[0] == LabelledText("a", "b", "yes")


def test_bad_lines_are_named_by_number_and_only_the_first_few():
    data = jsonl({"prompt": "a", "completion": "b"}, "{not json", "", {"prompt": ""}, [1, 2], {"text": "x", "label": 1})
    with pytest.raises(TrainingFileError) as err:
        parse_training_file(data, LIMITS)
    message = str(err.value)
    assert message.startswith("file has 4 invalid lines: line 2: invalid JSON")
    assert 'line 4: "prompt" must be a non-empty string' in message and "and 2 more" in message
    assert "line 5" not in message  # only the first two are spelled out


def test_chat_problems_name_the_message():
    bad = {"messages": [{"role": "tool", "content": "x"}]}
    no_answer = {"messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(TrainingFileError, match=r"line 1: messages\[0\]\.role must be one of.*line 2: no assistant"):
        parse_training_file(jsonl(bad, no_answer), LIMITS)


@pytest.mark.parametrize("limits,data,expected", [
    (FineTuningConfig(max_file_bytes=1024), b"x" * 2000, "2000 bytes; the limit is 1024"),
    (FineTuningConfig(max_file_lines=1), jsonl({"prompt": "a", "completion": "b"}) * 2, "2 lines; the limit is 1"),
    (FineTuningConfig(), jsonl({"prompt": "a", "completion": "b"}), "1 examples; at least 2"),
    (FineTuningConfig(), b"\xff\xfe\n", "line 1: not UTF-8"),
])
def test_limits_and_encoding(limits, data, expected):
    with pytest.raises(TrainingFileError, match=expected):
        parse_training_file(data, limits)


def test_a_format_must_fit_the_backbone():
    check_fits_task("chat", "causal_lm")
    check_fits_task("text_pair_label", "seq_cls")
    with pytest.raises(TrainingFileError, match="a classifier, which trains on text_label or text_pair_label"):
        check_fits_task("chat", "seq_cls")
    with pytest.raises(TrainingFileError, match="1 distinct label"):
        check_labels(parse_training_file(jsonl({"text": "a", "label": 1}, {"text": "b", "label": 1}), LIMITS))


def test_a_jobs_files_are_checked_against_the_task_and_each_other():
    train = jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "neg"})
    valid = jsonl({"text": "c", "label": "pos"}, "", {"text": "d", "label": "meh"}, {"text": "e", "label": "ok"})
    parsed, checked = check_job_files(train, train, LIMITS, "seq_cls")
    assert parsed.labels == checked.labels == ["neg", "pos"] and parsed.lines == (1, 2)
    with pytest.raises(TrainingFileError) as err:
        check_job_files(train, valid, LIMITS, "seq_cls")
    assert err.value.param == "validation_file"
    assert str(err.value) == ("validation_file has 2 invalid lines: line 3: label 'meh' is not a label of the "
                              "training file; line 4: label 'ok' is not a label of the training file")
    with pytest.raises(TrainingFileError, match="training_file holds text_label examples") as err:
        check_job_files(train, None, LIMITS, "causal_lm")
    assert err.value.param == "training_file"
