"""The long-context retrieval tasks: reproducible, at their target lengths, each needle hidden once,
answers scored right, and ShareGPT filler that is ShareGPT's own text."""

from __future__ import annotations

from typing import Any

import pytest

from engine.bench.datasets import load_sharegpt
from engine.bench.retrieval_tasks import (
    FILLERS,
    NUM_KV_PAIRS,
    NUM_MULTI_NEEDLES,
    REPEAT_FILLER,
    TASKS,
    RetrievalSample,
    make_task_set,
    score_answers,
)

NUM_NEEDLES = {"passkey": 1, "niah_single": 1, "niah_multikey": NUM_MULTI_NEEDLES,
               "niah_multivalue": NUM_MULTI_NEEDLES, "kv_uuid": 1}
MAX_LENGTH_SHORTFALL = 0.02  # a prompt is at most its target and at most 2% under it


@pytest.fixture(scope="module")
def task_sets(tokenizer: Any) -> dict[tuple[str, str], list[RetrievalSample]]:
    """Three 1k-token samples of every task and filler (about 1 s in all)."""
    return {(task, filler): make_task_set(task, filler, 1024, 3, seed=7, tokenizer=tokenizer)
            for task in TASKS for filler in FILLERS}


def test_same_seed_same_set_and_longer_sets_extend_shorter_ones(tokenizer: Any) -> None:
    first = make_task_set("niah_multikey", "sharegpt", 1024, 3, seed=1, tokenizer=tokenizer)
    assert make_task_set("niah_multikey", "sharegpt", 1024, 3, seed=1, tokenizer=tokenizer) == first
    assert make_task_set("niah_multikey", "sharegpt", 1024, 4, seed=1, tokenizer=tokenizer)[:3] == first
    other_seed = make_task_set("niah_multikey", "sharegpt", 1024, 3, seed=2, tokenizer=tokenizer)
    assert {s.prompt for s in other_seed}.isdisjoint(s.prompt for s in first)
    assert len({s.prompt for s in first}) == 3  # the samples of one set differ too


@pytest.mark.parametrize("length", [1024, 2048, 4096])
@pytest.mark.parametrize("filler", FILLERS)
@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
def test_prompt_lengths_fit_the_target(tokenizer: Any, length: int, filler: str, prompt_format: str) -> None:
    for sample in make_task_set("passkey", filler, length, 2, tokenizer=tokenizer, prompt_format=prompt_format):
        assert sample.prompt_len == len(tokenizer.encode(sample.prompt))  # as the engine encodes it
        assert length * (1 - MAX_LENGTH_SHORTFALL) <= sample.prompt_len <= length


def test_each_needle_once_and_answers_only_inside_needles(task_sets: dict) -> None:
    for (task, _), samples in task_sets.items():
        for sample in samples:
            assert len(sample.needles) == len(sample.depths) == NUM_NEEDLES[task]
            assert len(set(sample.needles)) == len(sample.needles)
            for needle in sample.needles:
                assert sample.prompt.count(needle) == 1
            for answer in sample.answers:
                assert sample.prompt.count(answer) == sum(needle.count(answer) for needle in sample.needles) >= 1
            assert list(sample.depths) == sorted(sample.depths) and all(0 <= d <= 1 for d in sample.depths)
            assert [sample.prompt.index(n) for n in sample.needles] == sorted(sample.prompt.index(n)
                                                                              for n in sample.needles)


def test_answers_per_task(task_sets: dict) -> None:
    for (task, _), samples in task_sets.items():
        for sample in samples:
            if task == "passkey":
                assert len(sample.answers) == 1 and len(sample.answers[0]) == 5 and sample.answers[0].isdigit()
                assert sample.prompt.endswith("The pass key is ")
            elif task == "niah_multivalue":
                assert len(set(sample.answers)) == NUM_MULTI_NEEDLES
                assert all(f"is: {answer}." in needle for answer, needle in zip(sample.answers, sample.needles))
            elif task == "kv_uuid":
                (json_object,) = sample.needles
                assert json_object.count('": "') == NUM_KV_PAIRS
                assert f'": "{sample.answers[0]}"' in json_object  # the answer is a value, never a key
            else:  # niah_single, niah_multikey: one 7-digit number, its key in the question
                (answer,) = sample.answers
                asked = next(needle for needle in sample.needles if answer in needle)
                key = asked.removeprefix("One of the special magic numbers for ").split(" is:")[0]
                assert sample.prompt.endswith(f"The special magic number for {key} mentioned in the provided text is ")
                assert len(answer) == 7 and answer.isdigit()


def test_depths_vary_across_samples(tokenizer: Any) -> None:
    depths = [s.depths[0] for s in make_task_set("passkey", "repeat", 1024, 20, tokenizer=tokenizer)]
    assert min(depths) < 0.25 and max(depths) > 0.75


def test_repeat_filler_is_the_repeated_sentences(task_sets: dict) -> None:
    """With the needles taken out, the filler is the five sentences over and over (the last one may
    be cut short where the length ran out)."""
    filler_sentences = {sentence.strip() for sentence in REPEAT_FILLER.split(".") if sentence.strip()}
    for (task, filler), samples in task_sets.items():
        if filler != "repeat":
            continue
        for sample in samples:
            sentences = [sentence.strip() for sentence in _haystack(sample).split(".") if sentence.strip()]
            assert len(sentences) >= 100
            assert set(sentences[:-1]) == filler_sentences


def test_sharegpt_filler_is_whole_sharegpt_records(task_sets: dict) -> None:
    """With the needles taken out, the filler is ShareGPT records one after another, each laid
    out as `sharegpt_token_stream` lays it out (turns and records apart by blank lines), the
    last one cut where the length ran out; and no two samples start with the same record."""
    records = _sharegpt_texts_by_opening()
    openings = []
    for (task, filler), samples in task_sets.items():
        if filler != "sharegpt":
            continue
        for sample in samples:
            haystack, position = _haystack(sample), 0
            while position < len(haystack):
                rest = haystack[position:]
                record = next((text for text in records.get(rest[:OPENING_LEN], [])
                               if rest.startswith(text) or text.startswith(rest)), None)
                assert record is not None, f"{task}: no ShareGPT record reads {rest[:80]!r}"
                position += len(record)
            openings.append(haystack[:OPENING_LEN])
    assert len(set(openings)) == len(openings) == len(TASKS) * 3


OPENING_LEN = 40


def _sharegpt_texts_by_opening() -> dict[str, list[str]]:
    """Every ShareGPT record's text followed by a blank line, by its first OPENING_LEN characters."""
    texts: dict[str, list[str]] = {}
    for record in load_sharegpt():
        turns = [turn.get("value") or "" for turn in record.get("conversations") or []]
        text = "\n\n".join(turn for turn in turns if turn.strip())
        if text:
            texts.setdefault(text[:OPENING_LEN], []).append(text + "\n\n")
    return texts


def _haystack(sample: RetrievalSample) -> str:
    """The filler between the instruction and the question, needles (and the separator each
    brought) taken out."""
    text = sample.prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
    for needle in sample.needles:
        text = text.replace(needle + "\n", "").replace(needle + " ", "").replace(needle, "")
    return text


@pytest.mark.parametrize("generated, answers, expected", [
    (" 48213. The pass key is 48213.", ("48213",), 1.0),
    (" 48231.", ("48213",), 0.0),  # a near miss scores nothing
    ("", ("48213",), 0.0),
    (" 1234567, 7654321 and 1111111.", ("1234567", "7654321", "2222222", "1111111"), 0.75),
    (" ABCDEF12-0000", ("abcdef12-0000",), 1.0),  # case-insensitive, as RULER scores
])
def test_score_answers(generated: str, answers: tuple[str, ...], expected: float) -> None:
    assert score_answers(generated, answers) == expected


def test_sample_score_uses_its_answers(task_sets: dict) -> None:
    sample = task_sets["niah_multivalue", "repeat"][0]
    assert sample.score(" " + ", ".join(sample.answers)) == 1.0
    assert sample.score(" " + sample.answers[1]) == 1 / NUM_MULTI_NEEDLES
    assert sample.score(" I do not know.") == 0.0


def test_chat_format_opens_the_assistant_turn_with_the_answer_prefix(tokenizer: Any) -> None:
    (chat,) = make_task_set("passkey", "repeat", 1024, 1, tokenizer=tokenizer, prompt_format="chat")
    (raw,) = make_task_set("passkey", "repeat", 1024, 1, tokenizer=tokenizer, prompt_format="raw")
    assert chat.answers == raw.answers and chat.needles == raw.needles
    assert chat.prompt.startswith("<|im_start|>system") and chat.prompt.endswith("<|im_start|>assistant\nThe pass key is ")


def test_bad_arguments_are_refused(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        make_task_set("passkeys", "repeat", 1024, 1, tokenizer=tokenizer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not fit"):
        make_task_set("kv_uuid", "repeat", 64, 1, tokenizer=tokenizer)
