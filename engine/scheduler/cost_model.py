"""How long will one engine step take?  A linear model over what the scheduler knows before the step.

A step's wall time is the sum of the kinds of work it does, each proportional to one count:

    step_s = overhead_s                                          Python, scheduling, launches, weight reads
           + per_scheduled_token_s        * num_scheduled_tokens   every linear layer runs once per token
           + per_prefill_seq_s            * num_prefill_seqs       attention runs per prefill chunk
           + per_sampled_seq_s            * num_sampled_seqs       LM-head row, sampler row, bookkeeping
           + per_decode_context_token_s   * num_decode_context_tokens    decode attention reads every key
           + per_prefill_attention_pair_s * num_prefill_attention_pairs  prefill attention, n * (c + n) scores
           + per_prefill_step_s           * layer_by_layer                a step with prefill chunks runs layer by layer
           + per_one_call_prefill_token_s * one_call_prefill_tokens       ... or as one call: its chunk rows
           + per_one_call_prefill_pair_s  * one_call_prefill_pairs        ... and their pairs in the decode kernel

A request scheduled for tokens [c, c + n) is a decode when n == 1 (it reads c + 1 keys: memory
bound) and a prefill chunk otherwise (n queries times c + n keys: compute bound), so the two kinds
of attention get separate coefficients.  Every decode samples, so a decode's own fixed cost is in
per_sampled_seq_s; a prefill chunk pays per_prefill_seq_s (the CPU attention runs each prefill
chunk on its own, decodes together) and per_sampled_seq_s only when it completes its prompt.
A step that holds any prefill chunk also pays per_prefill_step_s once where it runs layer by
layer (kernel by kernel): a decode-only step runs each layer as one C++ call
(engine/model/layers/fused_decode.py), and so does a step whose prefill chunks are small enough
(`OneCallSteps`, which the model runner states and the cost model is given).  Measured on a
2-vCPU Xeon (SmolLM2, elastic, native weights): a 2-token prompt's step 12.5 ms against 7.5 ms for
2 decodes; fitted on real steps, 19.5 ms a step and 4.5 ms a chunk, where without the term one
chunk's cost came out at 23 ms (and a start-up profile, whose 16-chunk step pins the per-chunk
cost, put it at 2.5 ms: the SLO policy's small chunks then ran 1.4x over).  The term is the only
one not a sum over chunks; the features stay sums, and the indicator is taken from them where a
step is priced (it only turns on as a chunk grows), so a policy still prices chunk by chunk.
In a one-call step a chunk's tokens run as rows of the decodes' row GEMMs and attend in the decode
kernel, which costs a token more than the large layer-by-layer chunks that pin
per_scheduled_token_s: those tokens pay per_one_call_prefill_token_s on top.  Measured on the
2-vCPU Xeon with AMX (elastic, native weights, start-up fit without the term): a 16-token chunk at
256 keys alone 20.2 ms against 14.5 predicted, beside 16 decodes 38.6 against 33.5, while decode
steps ran at 0.98x their prediction; the SLO policy's mixed steps then ran 1.1-1.4x theirs.
Such a chunk's tokens also attend in the decode kernel, row by row in fp32, where a layer-by-layer
chunk attends with bf16 matmuls: per_one_call_prefill_pair_s is what a pair costs there beyond
per_prefill_attention_pair_s (non-negative: where the decode kernel is as fast, as on an AMD EPYC
without AMX, the fit leaves it at 0).  Measured on the 2-vCPU Xeon with AMX: ~0.4 us a pair more.

A pruned prompt's chunk (engine/prompt_pruning.py) counts what it computes, in tokens of the whole
model (PrunePlan.layer_counts): a chunk before the prompt's end runs only the layers below the first
prune layer; the one that ends it also runs every kept token through the deep layers.  The one-call
bounds test what its widest layers hold instead (StepFeatures.one_call_counts), as the runner does.

Coefficients are fitted by non-negative least squares on relative errors, and refined online from
the engine's own steps.  Relative errors because a 20 ms decode step matters as much as a 1 s
prefill step, and because a step that another process slowed down tenfold then weighs no more
than one mispredicted by 100% (slowdowns are all that contention can do).

Nothing here imports torch: the scheduler's SLO policy and the simulator use this module.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from engine.scheduler.output import ScheduledRequest, SchedulerOutput


class ChunkPlan(Protocol):
    """What pricing needs of a prompt-pruning plan (engine/prompt_pruning.py, PrunePlan)."""

    def layer_counts(self, num_computed_tokens: int, num_scheduled_tokens: int) -> tuple[float, float, float]: ...

    def widest_layer_counts(self, num_computed_tokens: int, num_scheduled_tokens: int) -> tuple[int, int]: ...

FORMAT_VERSION = 1
# mixed_step_ratio: each observed mixed step's weight (about the last 20 count), and its bounds
# (one burst of contention must not halve every step's budget).
MIXED_RATIO_WEIGHT = 0.05
MIXED_RATIO_BOUNDS = (0.7, 1.5)


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """The counts a step's cost depends on (see the module docstring).  Features of a step are the
    sum of the features of its chunks, so a policy can price a candidate step chunk by chunk."""

    num_scheduled_tokens: int = 0
    num_prefill_seqs: int = 0  # requests running more than one token
    num_sampled_seqs: int = 0
    num_decode_context_tokens: int = 0
    num_prefill_attention_pairs: int = 0
    num_prefill_tokens: int = 0  # tokens of prefill chunks (num_scheduled_tokens less the decodes)
    # Not priced (not in as_tuple): what the step's widest layers hold beyond the counts above,
    # which average a pruned prompt's chunk over the layers (of_chunk).  Its shallow layers hold
    # every token of the chunk, and the model runner takes the one-call path only where every
    # layer's rows and pairs are within its bounds, so `one_call_counts` adds these back.
    # Measured (#15, 1.5x load, Intel Xeon): stage-A chunks of 30-60 tokens beside 1-5 chat
    # decodes, priced as ~half that many rows, passed this plan's 32-row bound, which the
    # runner's shallow layers, holding every token, did not: 13 steps in a row ran layer by layer
    # at 35-66 ms against ~26 ms predicted, and the chats' TPOT target was lost.
    num_extra_widest_rows: int = 0
    num_extra_widest_pairs: int = 0

    @classmethod
    def of_chunk(cls, num_computed_tokens: int, num_scheduled_tokens: int, samples: bool,
                 plan: ChunkPlan | None = None) -> StepFeatures:
        """One request running tokens [num_computed_tokens, num_computed_tokens + num_scheduled_tokens);
        `plan`: its prompt-pruning plan, whose chunks compute fewer rows than they hold."""
        if plan is None:
            return cls(*_chunk_counts(num_computed_tokens, num_scheduled_tokens, samples))
        rows, keys, pairs = plan.layer_counts(num_computed_tokens, num_scheduled_tokens)
        widest_rows, widest_pairs = plan.widest_layer_counts(num_computed_tokens, num_scheduled_tokens)
        is_decode = num_scheduled_tokens == 1
        rows, pairs = max(1, round(rows)), 0 if is_decode else round(pairs)
        return cls(rows, int(not is_decode), int(samples), round(keys) if is_decode else 0, pairs,
                   0 if is_decode else rows, max(0, widest_rows - rows), 0 if is_decode else max(0, widest_pairs - pairs))

    def __add__(self, other: StepFeatures) -> StepFeatures:
        # PERF: field by field (1.1 us, against 1.9 for a zip of as_tuple()s): the chunk-size
        # search and the simulator add features many times a step.
        return StepFeatures(
            self.num_scheduled_tokens + other.num_scheduled_tokens, self.num_prefill_seqs + other.num_prefill_seqs,
            self.num_sampled_seqs + other.num_sampled_seqs,
            self.num_decode_context_tokens + other.num_decode_context_tokens,
            self.num_prefill_attention_pairs + other.num_prefill_attention_pairs,
            self.num_prefill_tokens + other.num_prefill_tokens,
            self.num_extra_widest_rows + other.num_extra_widest_rows,
            self.num_extra_widest_pairs + other.num_extra_widest_pairs)

    def one_call_counts(self) -> tuple[int, int]:
        """(rows, prefill pairs) of the step's widest layers: what the one-call bounds test."""
        return (self.num_scheduled_tokens + self.num_extra_widest_rows,
                self.num_prefill_attention_pairs + self.num_extra_widest_pairs)

    def as_tuple(self) -> tuple[int, ...]:
        return (self.num_scheduled_tokens, self.num_prefill_seqs, self.num_sampled_seqs,
                self.num_decode_context_tokens, self.num_prefill_attention_pairs, self.num_prefill_tokens)

    @property
    def is_empty(self) -> bool:
        return self.num_scheduled_tokens == 0


def _chunk_counts(num_computed_tokens: int, num_scheduled_tokens: int, samples: bool) -> tuple[int, ...]:
    n, c = num_scheduled_tokens, num_computed_tokens
    is_decode = n == 1
    return (n, int(not is_decode), int(samples), c + 1 if is_decode else 0, 0 if is_decode else n * (c + n),
            0 if is_decode else n)


def features_of_chunks(chunks: Iterable[tuple[int, int, bool]]) -> StepFeatures:
    """Features of a step running (num_computed_tokens, num_scheduled_tokens, samples) chunks."""
    # PERF: one pass over plain ints; the simulator calls this every simulated step.
    tokens = prefill_seqs = sampled = decode_context = prefill_pairs = prefill_tokens = 0
    for c, n, samples in chunks:
        tokens += n
        sampled += samples
        if n == 1:
            decode_context += c + 1
        else:
            prefill_seqs += 1
            prefill_pairs += n * (c + n)
            prefill_tokens += n
    return StepFeatures(tokens, prefill_seqs, sampled, decode_context, prefill_pairs, prefill_tokens)


def features_of(scheduler_output: SchedulerOutput) -> StepFeatures:
    """Features of the step a SchedulerOutput describes."""
    return features_of_scheduled(scheduler_output.scheduled)


def features_of_scheduled(scheduled: Iterable[ScheduledRequest],
                          pricing: Callable[[Any], ChunkPlan | None] | None = None) -> StepFeatures:
    """Features of a step holding these requests' chunks, pruned prompts' chunks at what they
    compute; `pricing`: how to price a prune plan instead (None: the plan itself; a pricing that
    gives None prices the chunk as a plain one, the whole prompt's)."""
    scheduled = list(scheduled)
    features = features_of_chunks((s.num_computed_tokens, s.num_scheduled_tokens, s.samples)
                                  for s in scheduled if s.request.prune_plan is None)
    for s in scheduled:
        plan = s.request.prune_plan
        if plan is not None:
            features += StepFeatures.of_chunk(s.num_computed_tokens, s.num_scheduled_tokens, s.samples,
                                              plan if pricing is None else pricing(plan))
    return features


@dataclass(frozen=True, slots=True)
class OneCallSteps:
    """Which steps holding prefill chunks still run each decoder layer as one call (and so pay no
    per_prefill_step_s): at most max_rows rows in all and max_prefill_pairs prefill attention
    pairs.  The model runner states its bounds (engine/model/layers/fused_decode.py applies the
    same test to each layer's batch); None where it has no such path."""

    max_rows: int
    max_prefill_pairs: int

    def fits(self, num_rows: int, num_prefill_pairs: int) -> bool:
        """The one test: a step of num_rows rows whose chunks attend num_prefill_pairs pairs."""
        return num_rows <= self.max_rows and num_prefill_pairs <= self.max_prefill_pairs

    def covers(self, features: StepFeatures) -> bool:
        return self.fits(*features.one_call_counts())


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured step: what ran and how long it took (seconds of wall time)."""

    features: StepFeatures
    elapsed_s: float


@dataclass(frozen=True)
class CostCoefficients:
    """Seconds per unit of each feature, in StepFeatures order after the fixed overhead; all >= 0."""

    overhead_s: float = 0.0
    per_scheduled_token_s: float = 0.0
    per_prefill_seq_s: float = 0.0
    per_sampled_seq_s: float = 0.0
    per_decode_context_token_s: float = 0.0
    per_prefill_attention_pair_s: float = 0.0
    per_prefill_step_s: float = 0.0  # once per step with a prefill chunk (module docstring)
    per_one_call_prefill_token_s: float = 0.0  # a chunk token's extra cost where its step runs as one call
    per_one_call_prefill_pair_s: float = 0.0  # a chunk pair's extra cost there (the decode kernel's attention)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"cost coefficient {f.name} must be finite and non-negative, got {value}")

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class OnlineFitConfig:
    """How `observe` refines the coefficients: a sliding-window refit, pulled toward the prior."""

    window_size: int = 256  # most recent observed steps the refit uses
    refit_interval: int = 16  # refit after this many observations (a refit of 256 steps: ~0.3 ms)
    # Pull toward the prior: each coefficient pays prior_weight * (relative change)^2, each observed
    # step its relative error^2 (so at 0.1, doubling one coefficient costs as much as 10 steps
    # mispredicted by 10%).  Any positive weight keeps coefficients of features the window never
    # exercises at their prior values; larger weights also slow the following of real drift.
    prior_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.refit_interval < 1:
            raise ValueError(f"window_size and refit_interval must be positive, got {self.window_size}, "
                             f"{self.refit_interval}")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be non-negative, got {self.prior_weight}")


class StepCostModel:
    """Predicts a step's wall time; `fit` from samples, `observe` real steps to follow drift."""

    def __init__(self, coefficients: CostCoefficients, *, description: str = "",
                 online: OnlineFitConfig = OnlineFitConfig(), one_call: OneCallSteps | None = None) -> None:
        self.prior = coefficients  # what observations are pulled toward
        self.one_call = one_call  # prefill steps that pay no per_prefill_step_s (None: every one pays)
        self.coefficients = coefficients
        self.description = description
        self.online = online
        self._weights = coefficients.as_tuple()
        self._window: deque[tuple[StepFeatures, float]] = deque(maxlen=online.window_size)
        self._num_since_refit = 0
        # Measured over predicted time of recent steps that ran decodes and prefill chunks together
        # (an EWMA, kept within MIXED_RATIO_BOUNDS).  A linear fit over every kind of step is
        # biased for these (measured here: 10% short at the median), and they are the steps whose
        # time a TPOT bound caps, so the SLO policy divides its bound by this.
        self.mixed_step_ratio = 1.0
        # The same overrun in seconds (an EWMA of measured minus predicted, each sample within
        # MIXED_RATIO_BOUNDS of its step's prediction).  The simulator adds this rather than scale
        # by the ratio: it serves other policies' steps too, and the overrun does not grow with the
        # chunk.  Measured here: scaled by the ratio the slo policy's ~30-token chunks beside a few
        # decodes had taught it, FCFS's 512-token mixed steps (which run at ~1.0x the fit) ran so
        # much slower in simulation that its attainment at 1.5x load came out 0.47 against 0.88
        # measured (0.93 simulated at a ratio of 1.0, 0.78 at 1.3).
        self.mixed_step_excess_s = 0.0

    # ---- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(cls, samples: Sequence[StepSample], *, description: str = "",
            online: OnlineFitConfig = OnlineFitConfig(), one_call: OneCallSteps | None = None) -> StepCostModel:
        """Non-negative least squares on relative errors over `samples` (at least one)."""
        if not samples:
            raise ValueError("fitting a step cost model needs at least one sample")
        rows = np.array([_design_row(s.features, one_call) for s in samples], dtype=np.float64)
        elapsed = np.array([s.elapsed_s for s in samples], dtype=np.float64)
        if not (elapsed > 0).all():
            raise ValueError("every sample needs a positive elapsed_s")
        # Dividing each row by its target makes residuals relative; column scaling conditions NNLS.
        weighted = rows / elapsed[:, None]
        scale = np.sqrt((weighted ** 2).mean(axis=0))
        scale[scale == 0] = 1.0
        solution = nnls(weighted / scale, np.ones(len(samples))) / scale
        return cls(CostCoefficients(*solution.tolist()), description=description, online=online, one_call=one_call)

    # ---- prediction --------------------------------------------------------------------------

    def predict_s(self, features: StepFeatures) -> float:
        """Predicted wall time of a step with these features; 0 for an empty step."""
        return 0.0 if features.is_empty else self.linear_s(features)

    def linear_s(self, features: StepFeatures) -> float:
        """The fitted model's value at these features, the fixed overhead included even where they
        are empty (a step's fixed share: its overhead and what it runs besides a prefill's tokens)."""
        return self._linear_s(features, self.runs_layer_by_layer(features))

    def _linear_s(self, features: StepFeatures, layer_by_layer: bool) -> float:
        # PERF: a plain-Python dot product; numpy's call overhead is larger for nine numbers.
        w = self._weights
        return (w[0] + w[1] * features.num_scheduled_tokens + w[2] * features.num_prefill_seqs
                + w[3] * features.num_sampled_seqs + w[4] * features.num_decode_context_tokens
                + self._pair_s(layer_by_layer) * features.num_prefill_attention_pairs
                + (w[6] if layer_by_layer else w[7] * features.num_prefill_tokens))

    def _pair_s(self, layer_by_layer: bool) -> float:
        """A prefill pair's cost: a one-call step's also pays per_one_call_prefill_pair_s."""
        return self._weights[5] if layer_by_layer else self._weights[5] + self._weights[8]

    def runs_layer_by_layer(self, features: StepFeatures) -> bool:
        """Whether a step with these features pays per_prefill_step_s (module docstring)."""
        return features.num_prefill_seqs > 0 and (self.one_call is None or not self.one_call.covers(features))

    def attention_share(self, features: StepFeatures) -> float:
        """The share of a step's predicted time that is prefill attention (its query x key pairs);
        0 for an empty step."""
        if features.is_empty:
            return 0.0
        layer_by_layer = self.runs_layer_by_layer(features)
        total_s = self._linear_s(features, layer_by_layer)
        return self._pair_s(layer_by_layer) * features.num_prefill_attention_pairs / total_s if total_s > 0 else 0.0

    def max_chunk_tokens(self, base: StepFeatures, num_computed_tokens: int, max_tokens: int,
                         budget_s: float, samples_at: int | None = None, plan: ChunkPlan | None = None) -> int:
        """The most tokens (<= max_tokens) a prefill chunk starting at num_computed_tokens can add
        to a step that already holds `base` and still be predicted to finish within budget_s; 0 if
        not even one fits.  The chunk samples when it reaches `samples_at` tokens (its request's
        tokens still to compute), if given; `plan`: a pruned prompt's (StepFeatures.of_chunk).
        The prediction grows with the chunk while the step stays on one side of the one-call
        bounds, but may fall where the chunk leaves them (per_prefill_step_s then replaces its
        tokens' per_one_call_prefill_token_s), so each side is searched on its own."""
        def features(n: int) -> StepFeatures:
            samples = samples_at is not None and n >= samples_at
            return base + StepFeatures.of_chunk(num_computed_tokens, n, samples, plan)

        def fits(n: int) -> bool:
            return self.predict_s(features(n)) <= budget_s

        # The bounds only ever stop covering a growing chunk: one call up to here, layer by layer after.
        last_one_call = _last_true(0, max_tokens, lambda n: not self.runs_layer_by_layer(features(n)))
        first_past = max(1, last_one_call + 1)
        past = _last_true(first_past, max_tokens, fits)
        return past if past >= first_past else max(_last_true(1, last_one_call, fits), 0)

    # ---- online refinement -------------------------------------------------------------------

    def observe(self, features: StepFeatures, elapsed_s: float) -> None:
        """Record a measured step; every refit_interval observations, refit over the window."""
        if features.is_empty or not elapsed_s > 0:
            return
        if features.num_prefill_seqs and features.num_decode_context_tokens:
            predicted_s = max(self.predict_s(features), 1e-9)
            self.mixed_step_ratio = bounded_ewma(self.mixed_step_ratio, elapsed_s / predicted_s,
                                                 MIXED_RATIO_WEIGHT, MIXED_RATIO_BOUNDS)
            low, high = ((bound - 1.0) * predicted_s for bound in MIXED_RATIO_BOUNDS)
            excess_s = min(max(elapsed_s - predicted_s, low), high)
            self.mixed_step_excess_s += MIXED_RATIO_WEIGHT * (excess_s - self.mixed_step_excess_s)
        self._window.append((features, elapsed_s))
        self._num_since_refit += 1
        if self._num_since_refit >= self.online.refit_interval:
            self.refit()

    def refit(self) -> None:
        """Minimize  sum_t ((x_t . w - y_t) / y_t)^2 + prior_weight * sum_j ((w_j - p_j) / s_j)^2  over
        w >= 0, where p is the prior and s_j = p_j (so a coefficient pays for its relative change).
        Solved in v_j = w_j / s_j: the column of feature j is then the fraction of each step it
        accounts for at scale s_j.  A coefficient the prior set to 0 (NNLS zeroes one of two
        features that always move together) gets s_j = the coefficient at which feature j alone
        would take a mean step, so that it can still grow; features the window never exercises
        keep their prior value."""
        self._num_since_refit = 0
        if not self._window:
            return
        rows = np.array([_design_row(x, self.one_call) for x, _ in self._window])
        elapsed = np.array([y for _, y in self._window])
        prior = np.array(self.prior.as_tuple())
        scale = prior.copy()
        mean_feature = rows.mean(axis=0)
        unset = (prior == 0) & (mean_feature > 0)
        scale[unset] = elapsed.mean() / mean_feature[unset]
        free = scale > 0
        num_free = int(free.sum())
        strength = math.sqrt(self.online.prior_weight)
        columns = np.vstack([rows[:, free] * scale[free] / elapsed[:, None], strength * np.eye(num_free)])
        targets = np.concatenate([np.ones(len(elapsed)), strength * (prior[free] > 0)])
        weights = prior.copy()
        weights[free] = nnls(columns, targets) * scale[free]
        self._set(CostCoefficients(*weights.tolist()))

    def _set(self, coefficients: CostCoefficients) -> None:
        self.coefficients = coefficients
        self._weights = coefficients.as_tuple()

    # ---- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the current coefficients (observations included) and the description."""
        data = {"format_version": FORMAT_VERSION, "description": self.description,
                "coefficients": asdict(self.coefficients)}
        if self.one_call is not None:
            data["one_call_steps"] = asdict(self.one_call)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, online: OnlineFitConfig = OnlineFitConfig()) -> StepCostModel:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"step cost model format_version {version!r} is not {FORMAT_VERSION}")
        known = {f.name for f in fields(CostCoefficients)}
        given = data.get("coefficients") or {}
        unknown = set(given) - known
        if unknown:
            raise ValueError(f"unknown step cost coefficients {sorted(unknown)}; known: {sorted(known)}")
        one_call = data.get("one_call_steps")
        return cls(CostCoefficients(**given), description=data.get("description", ""), online=online,
                   one_call=None if one_call is None else OneCallSteps(**one_call))

    def __repr__(self) -> str:
        return f"StepCostModel({self.coefficients})"


def bounded_ewma(average: float, sample: float, weight: float, bounds: tuple[float, float]) -> float:
    """An exponentially weighted average moved toward `sample` by `weight`, kept within `bounds`."""
    return min(max(average + weight * (sample - average), bounds[0]), bounds[1])


def _design_row(features: StepFeatures, one_call: OneCallSteps | None) -> tuple[float, ...]:
    """The regressors of a step (CostCoefficients order): 1, its first five features, whether it
    holds a prefill chunk that runs it layer by layer, and the prefill tokens and pairs of one that
    runs it as one call."""
    layer_by_layer = features.num_prefill_seqs > 0 and (one_call is None or not one_call.covers(features))
    one_call_tokens, one_call_pairs = ((0.0, 0.0) if layer_by_layer else
                                       (float(features.num_prefill_tokens), float(features.num_prefill_attention_pairs)))
    return (1.0, *features.as_tuple()[:5], float(layer_by_layer), one_call_tokens, one_call_pairs)


def _last_true(low: int, high: int, predicate: Callable[[int], bool]) -> int:
    """The largest n in [low, high] with predicate(n), for a predicate true up to some n and false
    after; low - 1 where it holds for none (binary search)."""
    if high < low or not predicate(low):
        return low - 1
    while low < high:  # invariant: predicate(low)
        middle = (low + high + 1) // 2
        if predicate(middle):
            low = middle
        else:
            high = middle - 1
    return low


def relative_errors(model: StepCostModel, samples: Iterable[StepSample]) -> list[float]:
    """(predicted - measured) / measured for each sample: how a fit is judged."""
    return [(model.predict_s(s.features) - s.elapsed_s) / s.elapsed_s for s in samples]


def nnls(a: np.ndarray, b: np.ndarray, max_iterations: int | None = None) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method).

    scipy.optimize.nnls does the same; scipy is not a dependency of the engine.  The problems here
    have six unknowns, so the cost is a few small least-squares solves.
    """
    num_unknowns = a.shape[1]
    x = np.zeros(num_unknowns)
    passive = np.zeros(num_unknowns, dtype=bool)  # unknowns free to be positive
    tolerance = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(a.shape)
    for _ in range(max_iterations or 3 * num_unknowns + 10):
        gradient = a.T @ (b - a @ x)
        candidates = ~passive & (gradient > tolerance)
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, gradient, -np.inf))] = True
        x = _nnls_inner_loop(a, b, x, passive)
    return x


def _nnls_inner_loop(a: np.ndarray, b: np.ndarray, x: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """Solve on the passive set; while that leaves a passive unknown <= 0, step back toward the
    last feasible x until one hits zero and drop it from the set."""
    while True:
        z = np.zeros_like(x)
        z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
        if (z[passive] > 0).all():
            return z
        blocking = passive & (z <= 0)
        step = np.min(x[blocking] / (x[blocking] - z[blocking]))
        x = x + step * (z - x)
        passive &= x > 1e-15
        x[~passive] = 0.0
        if not passive.any():
            return x
