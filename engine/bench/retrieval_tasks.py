"""Long-context retrieval tasks, generated offline: the evaluation sets of prompt pruning.

A pruned prefill must keep the few prompt tokens the answer needs.  Each task hides needles in a
haystack of filler text and asks for what they hold (task names follow RULER's where it has one):

| task              | hidden                                          | asked                       |
|-------------------|-------------------------------------------------|-----------------------------|
| `passkey`         | "The pass key is 12345. Remember it. ..."       | the pass key                |
| `niah_single`     | one "special magic number" (7 digits) for a key | that number                 |
| `niah_multikey`   | 4 such needles, each with another key           | the number of one key       |
| `niah_multivalue` | 4 needles with one key, 4 numbers               | all 4 numbers               |
| `kv_uuid`         | a JSON object of 4 UUID -> UUID pairs           | the value of one key        |

Fillers: `repeat` (the passkey papers' "The grass is green. The sky is blue. ..." over and over)
or `sharegpt` (ShareGPT V3 conversations, read by `engine.bench.datasets`; each sample its own
seeded stretch).  A prompt is the instruction, the haystack with the needles at seeded depths
(snapped to a sentence start), then the question and an answer prefix:

    | instruction | filler ... needle ... filler ... needle ... filler | question | answer prefix |
                  ^ depth 0      ^ depths[0]          ^ depths[1]         ^ depth 1

(depths as fractions of the filler's characters, sorted; each needle appears exactly once).

Its length, counted by the model's own tokenizer on the whole prompt as sent (template included),
is fitted to the target: at most `length`, and within a few tokens of it.

Prompt format: `raw`, a completion prompt ending in the answer prefix ("... The pass key is "),
is the default; `chat` puts the same text in a user turn of the chat template and opens the
assistant's turn with the answer prefix (as RULER prompts chat models).  Measured on
SmolLM2-135M-Instruct (bf16, greedy, 1k tokens, ShareGPT filler, seed 0, 10 samples a cell;
benchmarks/retrieval_baseline.py --prompt-format raw|chat --fillers sharegpt --lengths 1024):

    | format | passkey | niah_single | niah_multikey | kv_uuid | all     |
    |--------|---------|-------------|---------------|---------|---------|
    | raw    | 10/10   | 10/10       | 6/10          | 5/10    | 31/40   |
    | chat   | 10/10   | 10/10       | 7/10          | 4/10    | 31/40   |

The template buys nothing measurable (one sample either way on the two hard tasks), so raw wins
on the rest: its prompt spends no tokens on the template and system turn, and it is exactly what
the pruning path sees through /v1/completions and `LLM.generate`.  What did matter is the answer
prefix's last token (see `_TaskText.answer_prefix`).

Scoring is RULER's string match: the fraction of the expected answers found in the generated text
(case-insensitive), so 0 or 1 for every task but `niah_multivalue`.

Everything is a pure function of (task, filler, length, seed, sample index) and the tokenizer:
the same arguments give the same prompts, and a larger `num_samples` extends a set, never changes
its first samples.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from engine.bench.datasets import DecodingTokenizer, sharegpt_token_stream

Task = Literal["passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_uuid"]
Filler = Literal["repeat", "sharegpt"]
PromptFormat = Literal["raw", "chat"]
TASKS: tuple[Task, ...] = get_args(Task)
FILLERS: tuple[Filler, ...] = get_args(Filler)
PROMPT_FORMATS: tuple[PromptFormat, ...] = get_args(PromptFormat)
LENGTHS = (1024, 2048, 4096)  # the target prompt lengths of the pruning report, in tokens

REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NUM_MULTI_NEEDLES = 4  # RULER's multi-key needles (1 asked, 3 distractors) and multi-value values
NUM_KV_PAIRS = 4
# Rounds of build-and-measure to fit a prompt to its target length: each round moves the filler's
# token budget by the difference measured (BPE merges at the seams make it a few tokens off).
MAX_FIT_ROUNDS = 6
# Redraws of a sample's needles when an answer already occurs in its filler (a 5-digit number in
# ShareGPT text): the answers must occur only where the needles put them.
MAX_REDRAWS = 20

# RULER draws its keys from the wonderwords lists; a fixed list keeps the sets offline.
_ADJECTIVES = ("ambitious", "bitter", "brave", "calm", "clever", "curious", "damp", "eager", "fancy", "fierce",
               "gentle", "glossy", "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow", "nimble",
               "odd", "plain", "proud", "quiet", "rapid", "rusty", "shy", "silent", "tidy", "wary")
_NOUNS = ("anchor", "badger", "basket", "candle", "canyon", "cobbler", "desert", "engine", "falcon", "garden",
          "harbor", "island", "jacket", "kettle", "ladder", "lantern", "meadow", "mirror", "notebook", "orchard",
          "pebble", "pillow", "quarry", "river", "saddle", "teapot", "tunnel", "violin", "wagon", "window")


class ChatTokenizer(DecodingTokenizer, Protocol):
    """The engine's tokenizer as the tasks use it: counting, decoding filler, the chat template."""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...


@dataclass(frozen=True, slots=True)
class RetrievalSample:
    """One prompt, what it hides, and what a correct answer contains."""

    task: Task
    filler: Filler
    prompt_format: PromptFormat
    prompt: str  # send as is: a completion prompt, or the chat template already applied
    prompt_len: int  # tokens of `prompt` as the engine encodes it
    answers: tuple[str, ...]  # all of them must appear in the generated text for a score of 1
    needles: tuple[str, ...]  # the sentences hidden in the filler, each exactly once in `prompt`
    depths: tuple[float, ...]  # where each needle starts, as a fraction of the haystack's characters
    max_tokens: int  # generated tokens enough to write every answer

    def score(self, generated_text: str) -> float:
        return score_answers(generated_text, self.answers)


def score_answers(generated_text: str, answers: Sequence[str]) -> float:
    """The fraction of `answers` contained in `generated_text`, case-insensitive (RULER's
    string_match_all): 1.0 or 0.0 for one answer, a share for several."""
    text = generated_text.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


@dataclass(frozen=True, slots=True)
class _TaskText:
    """What a task says and hides, before any filler."""

    instruction: str
    needles: tuple[str, ...]
    question: str
    # The start of the answer, the prompt's last characters.  It ends as the text before the value
    # does in the needle, in the same tokens: SmolLM2 writes " 12345" as a lone space token and one
    # token per digit, so a prefix ending in "is " (its own space token) asks for a digit next,
    # where one ending in "is" invites " the" or " a" (passkey at 2k, repeat filler: 100% against
    # 60% without the space, 10 samples).
    answer_prefix: str
    answers: tuple[str, ...]


def make_task_set(task: Task, filler: Filler, length: int, num_samples: int, seed: int = 0, *,
                  tokenizer: ChatTokenizer | None = None,
                  prompt_format: PromptFormat = "raw") -> list[RetrievalSample]:
    """`num_samples` prompts of `task` in `filler`, each at most `length` tokens (and within a few
    tokens of it) by `tokenizer` (default: the default model's).  Sample i depends only on the
    arguments and i, so the same call gives the same set."""
    if task not in TASKS or filler not in FILLERS or prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown task, filler or format {(task, filler, prompt_format)}: "
                         f"tasks {TASKS}, fillers {FILLERS}, formats {PROMPT_FORMATS}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be non-negative, got {num_samples}")
    if tokenizer is None:
        from engine.bench.workload import load_tokenizer  # loads the model file: only when asked

        tokenizer = load_tokenizer(None)
    return [make_sample(task, filler, length, random.Random(f"{task}/{filler}/{length}/{seed}/{index}"),
                        tokenizer, prompt_format) for index in range(num_samples)]


def make_sample(task: Task, filler: Filler, length: int, rng: random.Random, tokenizer: ChatTokenizer,
                prompt_format: PromptFormat = "raw") -> RetrievalSample:
    """One sample drawn from `rng`: the filler first, then needles whose answers it does not hold."""
    filler_ids = _filler_token_ids(tokenizer, filler, length, rng)
    filler_text = tokenizer.decode(filler_ids)
    for _ in range(MAX_REDRAWS):
        text = _TASK_TEXT[task](rng)
        if not any(answer in filler_text for answer in text.answers):
            break
    else:
        raise ValueError(f"{MAX_REDRAWS} draws of {task} answers all occur in the filler")
    depths = sorted(rng.random() for _ in text.needles)
    prompt, prompt_len, actual_depths = _fit(tokenizer, text, filler_ids, depths, length, prompt_format)
    return RetrievalSample(task=task, filler=filler, prompt_format=prompt_format, prompt=prompt,
                           prompt_len=prompt_len, answers=text.answers, needles=text.needles,
                           depths=actual_depths, max_tokens=_max_tokens(tokenizer, text.answers))


# --- the tasks -----------------------------------------------------------------------------------

def _passkey(rng: random.Random) -> _TaskText:
    """Landmark Attention's passkey task, worded after LongLoRA's evaluation."""
    passkey = str(rng.randint(10_000, 99_999))
    return _TaskText(
        instruction="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.",
        needles=(f"The pass key is {passkey}. Remember it. {passkey} is the pass key.",),
        question="What is the pass key?", answer_prefix="The pass key is ", answers=(passkey,))


_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the numbers afterwards.")


def _magic_number_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah(rng: random.Random, num_keys: int) -> _TaskText:
    """RULER's single and multi-key needles: one needle per key, the first key asked."""
    keys = _distinct(rng, num_keys, _word_key)
    values = _distinct(rng, num_keys, _magic_number)
    needles = [_magic_number_needle(key, value) for key, value in zip(keys, values)]
    rng.shuffle(needles)  # the asked needle is not always the first in the text
    return _TaskText(
        instruction=_NIAH_INSTRUCTION, needles=tuple(needles),
        question=f"What is the special magic number for {keys[0]} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {keys[0]} mentioned in the provided text is ",
        answers=(values[0],))


def _niah_multivalue(rng: random.Random) -> _TaskText:
    """RULER's multi-value needles: one key, NUM_MULTI_NEEDLES numbers, all of them asked."""
    key = _word_key(rng)
    values = _distinct(rng, NUM_MULTI_NEEDLES, _magic_number)
    return _TaskText(
        instruction=_NIAH_INSTRUCTION, needles=tuple(_magic_number_needle(key, value) for value in values),
        question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are ",
        answers=tuple(values))


def _kv_uuid(rng: random.Random) -> _TaskText:
    """Key-value retrieval (Lost in the Middle's task) with its JSON object as the one needle."""
    keys = _distinct(rng, NUM_KV_PAIRS, _uuid)
    values = _distinct(rng, NUM_KV_PAIRS, _uuid)
    asked = rng.randrange(NUM_KV_PAIRS)
    pairs = ", ".join(f'"{key}": "{value}"' for key, value in zip(keys, values))
    return _TaskText(
        instruction="A JSON object of keys and values is hidden within the following text. "
                    "I will ask you for the value of one key.",
        needles=("JSON data: {" + pairs + "}",),
        question=f'What is the value of the key "{keys[asked]}" in the JSON data?',
        answer_prefix=f'The value of the key "{keys[asked]}" is "', answers=(values[asked],))


_TASK_TEXT: dict[Task, Callable[[random.Random], _TaskText]] = {
    "passkey": _passkey,
    "niah_single": lambda rng: _niah(rng, 1),
    "niah_multikey": lambda rng: _niah(rng, NUM_MULTI_NEEDLES),
    "niah_multivalue": _niah_multivalue,
    "kv_uuid": _kv_uuid,
}


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng: random.Random, count: int, draw: Callable[[random.Random], str]) -> list[str]:
    """`count` different draws, in the order drawn."""
    found: list[str] = []
    while len(found) < count:
        value = draw(rng)
        if value not in found:
            found.append(value)
    return found


# --- filler, needles and length ------------------------------------------------------------------

def _filler_token_ids(tokenizer: ChatTokenizer, filler: Filler, length: int, rng: random.Random) -> list[int]:
    """At least `length` token ids of filler (more than any prompt of `length` tokens needs)."""
    if filler == "sharegpt":
        return sharegpt_token_stream(tokenizer, length, seed=rng.getrandbits(32))
    unit = tokenizer.encode(REPEAT_FILLER.strip())
    return tokenizer.encode(" ".join([REPEAT_FILLER.strip()] * (length // len(unit) + 1)))


def _fit(tokenizer: ChatTokenizer, text: _TaskText, filler_ids: list[int], depths: list[float], length: int,
         prompt_format: PromptFormat) -> tuple[str, int, tuple[float, ...]]:
    """The prompt with the most filler that encodes to at most `length` tokens, its length and its
    needles' depths.  Raises ValueError when even no filler at all is too long."""
    budget = length - len(tokenizer.encode(_render(tokenizer, text, "", prompt_format)))
    best: tuple[str, int, tuple[float, ...]] | None = None
    for _ in range(MAX_FIT_ROUNDS):
        haystack, actual_depths = _insert_needles(tokenizer.decode(filler_ids[:max(0, budget)]), text.needles, depths)
        prompt = _render(tokenizer, text, haystack, prompt_format)
        prompt_len = len(tokenizer.encode(prompt))
        if prompt_len <= length and (best is None or prompt_len > best[1]):
            best = (prompt, prompt_len, actual_depths)
        if prompt_len == length:
            break
        budget = min(len(filler_ids), budget + length - prompt_len)
    if best is None:
        raise ValueError(f"the task's own text does not fit in {length} tokens")
    return best


def _insert_needles(filler_text: str, needles: Sequence[str], depths: Sequence[float]) -> tuple[str, tuple[float, ...]]:
    """`filler_text` with needle i at the first sentence start at or after depths[i] (sorted) of its
    length, and where each landed, as a fraction of the filler's characters."""
    starts = [_sentence_start(filler_text, int(depth * len(filler_text))) for depth in depths]
    pieces, previous = [], 0
    for needle, start in zip(needles, starts):
        # The needle ends as the sentence it displaces began: after a line break, on its own line.
        separator = "\n" if start > 0 and filler_text[start - 1] == "\n" else " "
        pieces += [filler_text[previous:start], needle, separator]
        previous = start
    pieces.append(filler_text[previous:])
    size = max(1, len(filler_text))
    return "".join(pieces), tuple(start / size for start in starts)


def _sentence_start(text: str, position: int) -> int:
    """The first index at or after `position` where a sentence starts: after ". " or a newline, or
    the text's end."""
    for index in range(position, len(text)):
        if index == 0 or text[index - 1] == "\n" or text[max(0, index - 2):index] == ". ":
            return index
    return len(text)


def _render(tokenizer: ChatTokenizer, text: _TaskText, haystack: str, prompt_format: PromptFormat) -> str:
    """The prompt as sent: a completion prompt, or a user turn through the chat template with the
    answer prefix opening the assistant's turn (as RULER prompts chat models)."""
    body = f"{text.instruction}\n\n{haystack.strip()}\n\n{text.question}"
    if prompt_format == "raw":
        return f"{body} {text.answer_prefix}"
    return tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True) + text.answer_prefix


def _max_tokens(tokenizer: ChatTokenizer, answers: Sequence[str]) -> int:
    """Room for every answer with a separator, and a few tokens to spare; 16 at least."""
    return max(16, sum(len(tokenizer.encode(f" {answer},")) for answer in answers) + 4)
