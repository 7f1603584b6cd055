"""Fine-tuning files read and checked before any job queues: JSONL, one example a line, in one format.

- chat: `{"messages": [{"role": "system"|"developer"|"user"|"assistant", "content": "..."}, ...]}` with at
  least one assistant turn (an assistant turn may carry `"weight": 0` to be left out of the loss);
- prompt/completion: `{"prompt": "...", "completion": "..."}`;
- classification: `{"text": "...", "label": ...}`, or `{"text": "...", "text_pair": "...", "label": ...}`.

Chat and prompt/completion train a causal LM; text/label a classifier. Every line is parsed with
`json.loads` alone (nothing is ever unpickled or evaluated); a refused file's error names the first
bad lines by number, and files over the configured size or line count are refused whole.

Two checks, at two times (OpenAI's split): `parse_training_file` when a file is uploaded (a 400),
and `check_job_files` when a job that names it is validated (the job `failed`, naming the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from adapters.errors import TrainingFileError
from adapters.store.job_records import FORMATS_FOR_TASK, FileFormat, FineTuningConfig

CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    trained: tuple[bool, ...]  # per message: an assistant turn whose tokens carry the loss


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class LabelledText:
    text: str
    text_pair: str | None
    label: str


Example = ChatExample | PromptCompletion | LabelledText


@dataclass(frozen=True)
class ParsedFile:
    format: FileFormat
    examples: tuple[Example, ...]
    lines: tuple[int, ...] = ()  # each example's line number in the file, for errors found later

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.examples if isinstance(e, LabelledText)})


class LineProblem(ValueError):
    """What is wrong with one line (collected, then reported with its line number)."""


def parse_training_file(data: bytes, limits: FineTuningConfig, what: str = "file") -> ParsedFile:
    """The examples of a JSONL fine-tuning file, or TrainingFileError naming its first bad lines."""
    if len(data) > limits.max_file_bytes:
        raise TrainingFileError(f"{what} has {len(data)} bytes; the limit is {limits.max_file_bytes}", what)
    lines = data.split(b"\n")
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if len(numbered) > limits.max_file_lines:
        raise TrainingFileError(f"{what} has {len(numbered)} lines; the limit is {limits.max_file_lines}", what)
    examples: list[tuple[FileFormat, Example]] = []
    found_on: list[int] = []
    problems: list[str] = []
    for number, line in numbered:
        try:
            examples.append(parse_line(line))
        except LineProblem as problem:
            problems.append(f"line {number}: {problem}")
            continue
        found_on.append(number)
        if examples[-1][0] != examples[0][0]:
            problems.append(f"line {number}: a {examples[-1][0]} example in a {examples[0][0]} file")
    if problems:
        raise TrainingFileError(summary(what, problems, limits.reported_errors), what)
    if len(examples) < limits.min_examples:
        raise TrainingFileError(f"{what} has {len(examples)} examples; at least {limits.min_examples} are needed",
                                what)
    return ParsedFile(examples[0][0], tuple(example for _, example in examples), tuple(found_on))


def summary(what: str, problems: list[str], shown: int) -> str:
    more = len(problems) - shown
    listed = "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")
    return f"{what} has {len(problems)} invalid line{'s' if len(problems) > 1 else ''}: {listed}"


def parse_line(line: bytes) -> tuple[FileFormat, Example]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise LineProblem("not UTF-8 text") from None
    except (ValueError, RecursionError) as err:
        raise LineProblem(f"invalid JSON ({str(err).split(':')[0]})") from None
    if not isinstance(record, dict):
        raise LineProblem(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        return "chat", chat_example(record)
    if "prompt" in record or "completion" in record:
        return "prompt_completion", PromptCompletion(text(record, "prompt"), text(record, "completion"))
    if "text" in record or "label" in record:
        pair = text(record, "text_pair") if "text_pair" in record else None
        example = LabelledText(text(record, "text"), pair, label(record))
        return ("text_pair_label" if pair is not None else "text_label"), example
    raise LineProblem('expected "messages", "prompt" and "completion", or "text" and "label"')


def chat_example(record: dict[str, Any]) -> ChatExample:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise LineProblem('"messages" must be a non-empty list')
    turns, trained = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise LineProblem(f"{where} must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise LineProblem(f"{where}.role must be one of {', '.join(CHAT_ROLES)}")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise LineProblem(f"{where}.weight must be 0 or 1")
        turns.append((role, content_text(message.get("content"), where)))
        trained.append(role == "assistant" and weight == 1)
    if not any(trained):
        raise LineProblem("no assistant message to train on")
    return ChatExample(tuple(turns), tuple(trained))


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's shape)."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str) or not content.strip():
        raise LineProblem(f"{where}.content must be a non-empty string")
    return content


def text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise LineProblem(f'"{key}" must be a non-empty string')
    return value


def label(record: dict[str, Any]) -> str:
    """JSON 1, 1.0 and "1" name one class; true/false read as written."""
    value = record.get("label")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float | str) and str(value).strip():
        return str(value).strip()
    raise LineProblem('"label" must be a string or a number')


def check_fits_task(fmt: FileFormat, task: str, what: str = "file") -> None:
    """Refuse a file whose format the backbone cannot train on (a chat file for a classifier)."""
    allowed = FORMATS_FOR_TASK.get(task, ())
    if fmt not in allowed:
        kind = "a causal LM" if task == "causal_lm" else "a classifier"
        raise TrainingFileError(f"{what} holds {fmt} examples; this backbone is {kind}, which trains on "
                                f"{' or '.join(allowed)} examples", what)


def check_labels(parsed: ParsedFile, what: str = "training_file") -> None:
    if parsed.format in FORMATS_FOR_TASK["seq_cls"] and len(parsed.labels) < 2:
        raise TrainingFileError(f"{what} has {len(parsed.labels)} distinct label(s); a classifier needs 2 or more",
                                what)


def check_job_files(training: bytes, validation: bytes | None, limits: FineTuningConfig,
                    task: str) -> tuple[ParsedFile, ParsedFile | None]:
    """A job's files, parsed and checked against its backbone's task and against each other; or
    TrainingFileError whose `param` names the file (training_file or validation_file)."""
    train = parse_training_file(training, limits, "training_file")
    check_fits_task(train.format, task, "training_file")
    check_labels(train)
    if validation is None:
        return train, None
    valid = parse_training_file(validation, limits, "validation_file")
    check_fits_task(valid.format, task, "validation_file")
    known = set(train.labels)
    problems = [f"line {number}: label '{example.label}' is not a label of the training file"
                for number, example in zip(valid.lines, valid.examples, strict=True)
                if isinstance(example, LabelledText) and example.label not in known]
    if problems:
        raise TrainingFileError(summary("validation_file", problems, limits.reported_errors), "validation_file")
    return train, valid
