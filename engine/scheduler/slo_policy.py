"""SLO-aware scheduling: per-request TTFT and TPOT targets.

A TPOT target is a rate, not a step-by-step deadline: a request decoding at 40 ms a step with a
250 ms target may sit out several steps and still meet it.  This policy spends that slack: seats
go to the work whose target is closest to being missed, and everything else pauses (keeping its KV).

    budget      each step's token budget is the largest whose predicted step time keeps the
                tightest TPOT target among running decodes (Sarathi-Serve's rule), never fewer
                than the decodes plus MIN_PREFILL_TOKENS, so prefills still make progress; and
                each prefill chunk is priced where it lies (limit_chunk): a chunk late in a long
                prompt attends to every key before it, so the same tokens there cost several
                times what they cost at the prompt's start.  A chunk the bound cannot fit there
                waits for decode-only steps to bank the slack it needs (a TPOT target is a mean).
                Chunks are fitted beside the decodes that are due; a decode ahead of its schedule
                sits out a step whose bound the chunk has filled, and a prompt whose TTFT target
                is lost never breaks the bound.  A step is priced at the levels it runs at: the
                full model's prediction times the learned fraction of its level, or, where its
                chunks run at another level than its decodes, each part at its own
                (KnobCosts.priced_s);
    settings    (auto requests, elastic_choice.py) each step: the level from the pressures the
                targets put on the full model; an open prompt_keep from the queue and the load;
                a prompt whose TTFT target is lost (not even its fastest prefill meets it) runs at
                its floors, after every prompt that can still meet its own;
    order       decodes about to miss their TPOT (their next token, paced to DECODE_PACE of the
                target, is due within URGENT_STEPS steps), then prefills whose TTFT is still
                reachable in least-slack order (slack = TTFT deadline - now - predicted prefill
                time), then decodes ahead of schedule, then work whose target is already lost;
    admission   a new request is refused (AdmissionRejected -> HTTP 429) or, with best_effort,
                served last when its TTFT target is out of reach (the prefills due before it,
                less lost ones, which rank last anyway, at the steps the budget gives, scaled by
                how late first tokens have come against such predictions; an auto level counts
                at the lowest it may fall to) or when the decodes already admitted leave no seat
                time for one more at its TPOT target.

Step times come from a StepCostModel that the engine profiles at start-up and refines online.
The engine fills a request's missing targets from the server defaults (SLOConfig); requests with
no target at all are served after every request that has one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.config import SLOConfig
from engine.request import Request, SLOTarget
from engine.scheduler.cost_model import StepFeatures, features_of_chunks, features_of_scheduled
from engine.scheduler.elastic_choice import KEEP_LADDER
from engine.scheduler.knob_costs import StepLevels
from engine.scheduler.policy import AdmissionRejected, Displacement, SchedulingPolicy, phase

if TYPE_CHECKING:
    from engine.prompt_pruning import PrunePlan
    from engine.scheduler.cost_model import ChunkPlan, StepCostModel
    from engine.scheduler.elastic_choice import ElasticChoice
    from engine.scheduler.output import ScheduledRequest

# Keep the predicted step time this far under the tightest TPOT target: the model is a fit.
TPOT_SAFETY = 0.9
# Prefill tokens every step keeps even under tight TPOT targets, so waiting work cannot starve.
MIN_PREFILL_TOKENS = 16
# A decode is urgent when its next token is due within this many (predicted) steps.
URGENT_STEPS = 2.0
# Decodes are paced to this share of their TPOT target (their next token is due, and urgent, on
# that schedule).  Paced at the target itself, a decode that sits out steps ahead of schedule
# ends at a mean TPOT on the target's edge, and half end over it: measured at 1.5x load (72
# requests), slo@100's chats ended at a median TPOT of 38.6 ms against a 37.9 ms target, 12 of 24
# over it.
DECODE_PACE = TPOT_SAFETY
# Decode-only steps bank slack for a chunk the TPOT bound cannot fit (limit_chunk) only while they
# take less than this share of the bound: else slack would never build and prefills would starve.
BANKING_DECODE_SHARE = 0.6
# A prompt hurries when the prefill due up to and including it, at the pace the TPOT bound gives
# (prefill_span_s), would take more than HURRY_PRESSURE of the time left to its deadline (first
# tokens calibrated).  Where decode-only steps can bank slack, a hurried prompt's chunk does not
# crawl at what the bound fits beside the decodes: it waits while they bank slack and then runs
# at least BANKED_CHUNK_TOKENS (or the rest of the prompt) alone (limit_chunk).  Why: beside one or
# two chats the bound fits ~17 tokens of a document, each step paying the whole step's fixed cost
# for them (~570 tokens/s where the document alone prefills ~2,600), and at 0.5x load documents
# missed their first tokens that way, their TTFT pressure taking every auto request's level down.
# Banking, decode-only steps (~10 ms against a 30 ms pace) bank ~20 ms a step, so a cycle of a few
# of them and one 128-token chunk moves the document 2-3x faster, and the decodes stay on pace.
# Measured (auto alone on #15's run-17 trace and targets, alternating with the code before): at
# 0.5x load every request on the full model and whole prompt in 3 runs of 3 (before: 78-92%);
# at 1.5x attainment 0.79-0.88 against 0.76-0.85.
# At 0 (before: 0.5) every prompt hurries where banking is the faster way, on time or not: a
# prompt that crawls holds every prompt behind it.  At #15's 1.5x load, documents with time to
# spare crawled ~20 tokens a step beside one chat (~70 steps a document at ~1 a second), and the
# documents behind them were lost at arrival.  Measured (auto alone on run 36's trace and targets,
# Intel Xeon, taking turns with 0.5 three times): 1.5x attainment 0.889 / 0.972 / 0.972 against
# 0.861 / 0.889 / 0.903 (documents 0.67-0.92 against 0.67-0.75, chats' TPOT met); 0.5x, twice:
# 92% / 93% of requests wholly at level 100 against 93% / 96%.  One whole benchmark run on it
# (run 37) fell inside the old rule's range: 1.5x 0.85, 0.5x 86% (benchmarks/README.md).
HURRY_PRESSURE = 0.0
BANKED_CHUNK_TOKENS = 128
# A hurried prompt banks wherever decode-only steps take under this share of the decodes' pace
# (not of the bound, as BANKING_DECODE_SHARE: that rule keeps a chunk the bound cannot fit from
# waiting long, where a hurried prompt waits only when banking is the faster way, banked_span_s).
# Measured at 0.5x load of a 2.0 req/s capacity: a document behind 5 chat decodes (16 ms decode
# steps against a 22 ms bound and a 30 ms pace) could not bank under the bound's 60%, crawled, and
# took every auto request down to level 40 and itself to keep 0.3.  With this rule (auto alone on
# #15's run-19 trace and targets, alternating with the code before the hurry): 0.5x 90% / 99% / 96%
# of requests wholly at level 100 against 61% / 69% / 78%; 1.5x attainment 0.71 / 0.79 against
# 0.75 / 0.65.
HURRY_DECODE_SHARE = 0.8
# first_token_ratio: each first token's weight in the two EWMAs it is the ratio of, and its bounds.
FIRST_TOKEN_RATIO_WEIGHT = 0.2
FIRST_TOKEN_RATIO_BOUNDS = (0.5, 3.0)
# Only first tokens whose own prefill was predicted at this many seconds or more teach the ratio.
# A shorter prompt's first token comes at the end of whatever step it lands in, and that step is
# as long as the other prompts' chunks beside it make it: an error of step granularity, added
# once, that a ratio would multiply into every long prefill.  Measured at #15's 0.5x load: chats
# of 5-86 tokens that came during a document's 400 ms chunks waited ~400 ms against 11-45 ms
# predicted, took the ratio from 1.3 to 2.8 in one step, and the next two documents, which the
# full model then served in 0.65-0.84 s of a 1.96 s target, were pruned to keeps 0.3 and 0.5.
FIRST_TOKEN_MIN_OWN_S = 0.1
# First tokens remembered to find, in hindsight, the requests served before one that arrived earlier.
FIRST_TOKEN_HISTORY = 256

# Load: the full model's predicted time of the steps run over the last LOAD_WINDOW_S, whole prompts
# (what the full model would have needed), over the window (load_pressure).  Past KEEP_UTILIZATION
# of it, auto prompt_keeps fall: the full model could not serve such a load for long, and the
# quality table prices a keep far below a level.  The level falls for the load too once, with
# every auto prompt at its smallest keep, it is still past LEVEL_UTILIZATION.  Measured at 1.5x
# load (72 requests, fixed targets, auto alone): with the level falling past 0.8, attainment
# 0.96 / 0.90 / 0.82 at a mean level of 57-59; with only the keeps falling, 0.75 / 0.94 / 0.86 /
# 0.75 at a mean level of 93-99 (before either, 0.60-0.78).  With a level's prefill attending with
# its own heads (cheaper knobs), at 0.9 instead of 0.8, from a fresh start: 1.5x 0.97 / 0.94
# against 0.86 the same hour (0.85-0.96 in six earlier runs at 0.8), and at 0.5x every request on
# the full model and whole prompt against 87.5-96%: at 0.5x a 10 s window holds ~4 requests, and
# its Poisson bursts took it past 0.8 several times a run.
LOAD_WINDOW_S = 10.0
KEEP_UTILIZATION = 0.9
LEVEL_UTILIZATION = 0.9

# Decode seat time admitted TPOT targets may claim, as a fraction of what steps of nothing but
# decodes would give (the rest is for prefills and for the step-to-step spread).
MAX_DECODE_SEAT_SHARE = 0.6
TTFT_REJECT_REASON = "slo_ttft_unattainable"
TPOT_REJECT_REASON = "slo_tpot_unattainable"
NO_TARGET = SLOTarget()
# A prefill chunk's own cost (with the step's overhead).  It holds no tokens, so where the runner
# runs small chunks in one call (cost_model.OneCallSteps) it is priced as such a step, without
# per_prefill_step_s: optimistic for the chunks late in a long prompt, which are past the bounds
# and run layer by layer (how #15's run 17 measured it; benchmarks/README.md).
_ONE_CHUNK = StepFeatures(num_prefill_seqs=1)


class SLOPolicy(SchedulingPolicy):
    name = "slo"
    displacement = Displacement.PAUSE

    def __init__(self, config: SLOConfig, cost_model: StepCostModel, max_budget: int, max_num_seqs: int,
                 choice: ElasticChoice | None = None) -> None:
        """`choice`: how requests that leave their elastic level or prompt_keep to the server get
        them (engine/scheduler/elastic_choice.py); None: such requests run the full model whole."""
        self.config = config
        self.cost_model = cost_model
        self.max_budget = max_budget
        self.max_num_seqs = max_num_seqs
        self.choice = choice
        self._step_limit_s: float | None = None  # each step's bound from the tightest TPOT target; None: none
        self._slack_limit_s: float | None = None  # this step's bound from the decodes' banked slack
        # The decodes' banked slack as a step bound, where either rule lets decode-only steps bank
        # (BANKING_DECODE_SHARE for any chunk: then _slack_limit_s; HURRY_DECODE_SHARE for a hurried prompt)
        self._decode_slack_s: float | None = None
        # Of the wall time, the share decode-only steps take where they can bank slack for a hurried
        # prompt (under HURRY_DECODE_SHARE of the pace); None where they cannot (as of the last step).
        self._banking_decode_share: float | None = None
        self._hurried: set[str] = set()  # prompts that bank slack for large chunks (HURRY_PRESSURE)
        self._banking = False  # a hurried prompt sits this step out to bank slack, and every prompt with it
        # Measured over predicted first-token time of recent requests, as the ratio of an EWMA of
        # each (within FIRST_TOKEN_RATIO_BOUNDS): first_token_eta_s is a rate model of steps it
        # cannot see, so the predictions that admission and the prompt_keep choice act on are
        # scaled by it.  A request's prediction is taken in hindsight: the prefills due before it
        # when it arrived, its own, and those of requests that arrived later and got their first
        # token before it (work its arrival could not know of: a request with a loose target
        # waits for every tighter one that comes).  A ratio of sums weighs each request by its
        # predicted time: a short prompt whose first token waited a step says little about a
        # long prefill.  (Measured: a mean of each request's own ratio sat at its bound of 3 at
        # 0.5x load, and documents the full model served on time were pruned.)
        self._first_token_measured_s = 0.0
        self._first_token_eta_s = 0.0
        # request id -> (request, predicted first-token time at arrival, its own prefill's part)
        self._first_token_predicted: dict[str, tuple[Request, float, float]] = {}
        # (arrival, first token, own prefill's predicted time) of recent first tokens
        self._first_tokens_served: deque[tuple[float, float, float]] = deque(maxlen=FIRST_TOKEN_HISTORY)
        self._decode_features = StepFeatures()  # the running decodes' share of this step
        # Steps run within LOAD_WINDOW_S: (start, the full model's predicted time, whole prompts,
        # and of it the prefill of prompts with an auto keep), and the sums of each
        self._steps_run: deque[tuple[float, float, float]] = deque()
        self._steps_run_s = self._steps_run_prunable_s = 0.0
        self._lost_at, self._lost = -math.inf, {}  # _is_lost's answers at the time _lost_at
        self._fixed_for: StepFeatures | None = None  # the decode features _fixed_s was priced with
        self._fixed_s = 0.0
        self._last_step_s = cost_model.predict_s(StepFeatures.of_chunk(0, max_budget, False))
        self._prompt_level: int | None = None  # the widest level among prompts to prefill, this step

    @staticmethod
    def target(request: Request) -> SLOTarget:
        # The engine has already filled in the server-wide defaults (SLOConfig) for missing targets.
        return request.slo or NO_TARGET

    def deadline(self, request: Request) -> float:
        ttft_s = self.target(request).ttft_s
        return math.inf if ttft_s is None else request.arrival_time + ttft_s

    # ---- ranking -----------------------------------------------------------------------------

    def rank_key(self, request: Request, now: float) -> tuple:
        if phase(request) == 0:
            slack = self.next_token_due(request, DECODE_PACE) - now
            return (0 if self._is_urgent(request, now) else 2, slack, request.arrival_time, request.request_id)
        return (3 if self._is_lost(request, now) else 1, self._latest_start(request), request.arrival_time,
                request.request_id)

    def _latest_start(self, request: Request) -> float:
        # Slack is taken on the whole prefill, not on what is left of it: on the remainder, equal
        # deadlines would take turns chunk by chunk and every one of them would finish late.
        return self.deadline(request) - self.prefill_time_s(request.num_tokens)

    def _is_lost(self, request: Request, now: float) -> bool:
        """A prompt served best effort, or one whose TTFT target not even its fastest prefill can
        meet any more (_fastest_prefill_s).  Lost prompts rank after every other prompt, so this
        must not be pessimistic: taken on the whole prompt at the full model under the decodes'
        TPOT bound, a document that had waited a second behind another counted as lost, ranked
        after every later arrival and waited 15-23 s against a 5.5 s target (1.5x load)."""
        if now != self._lost_at:  # PERF: ranking, the choice and the budget each ask, every step
            self._lost_at, self._lost = now, {}
        lost = self._lost.get(request.request_id)
        if lost is None:
            lost = request.best_effort or now + self._fastest_prefill_s(request) > self.deadline(request)
            self._lost[request.request_id] = lost
        return lost

    def _fastest_prefill_s(self, request: Request) -> float:
        """The soonest what is left of a prompt's prefill can end: at the lowest level and keep it
        may still run at, in whole-budget chunks with nothing beside them."""
        work_s, tokens = self._prefill_work(request.num_computed_tokens, request.num_tokens_to_compute)
        work_s *= self._keep_fraction(request, lowest=True) * self._prefill_fraction(request, lowest=True)
        return work_s + math.ceil(tokens / self.max_budget) * self.cost_model.linear_s(_ONE_CHUNK)

    def _is_urgent(self, request: Request, now: float) -> bool:
        """A decode whose next token is due within URGENT_STEPS (predicted) steps."""
        return self.next_token_due(request, DECODE_PACE) - now < URGENT_STEPS * self._last_step_s

    def next_token_due(self, request: Request, pace: float = 1.0) -> float:
        """When the next token must come for the request's mean TPOT to stay on target (at
        `pace` times the target)."""
        tpot_s = self.target(request).tpot_s
        first = request.metrics.first_token_time
        if tpot_s is None or first is None:
            return math.inf if tpot_s is None else -math.inf
        return first + pace * tpot_s * request.num_output_tokens

    def prefill_time_s(self, num_tokens: int) -> float:
        """Predicted time to prefill a whole prompt of num_tokens alone, at the steps this policy
        gives now."""
        return self.prefill_span_s(*self._prefill_work(0, num_tokens))

    def prefill_span_s(self, work_s: float, num_tokens: int) -> float:
        """Wall time of `work_s` seconds of prefill compute over num_tokens tokens
        (_prefill_work), at the steps this policy gives now.  Every step also pays fixed costs
        (overhead, the running decodes, a chunk's own): under a TPOT bound a step lasts the bound
        and prefill work fills what the fixed costs leave of it (never fewer than
        MIN_PREFILL_TOKENS); without one, chunks run the whole budget.  The small chunks a bound
        gives run as one call a layer where the runner can (cost_model.OneCallSteps), so there each
        token also pays per_one_call_prefill_token_s: left out, a document beside one chat was
        predicted at ~0.8 s where it took ~2.5 s (17 tokens a step, ~570 tokens/s)."""
        if num_tokens <= 0:
            return 0.0
        fixed_s = self._fixed_step_s()
        room = max(1, self.max_budget - self._decode_features.num_sampled_seqs)
        fastest_s = work_s + math.ceil(num_tokens / room) * fixed_s
        limit_s = self._step_limit_s
        if limit_s is None:
            return fastest_s
        work_s += self.cost_model.coefficients.per_one_call_prefill_token_s * num_tokens
        floor_s = work_s + math.ceil(num_tokens / MIN_PREFILL_TOKENS) * fixed_s
        if limit_s <= fixed_s:
            return floor_s
        return min(max(fastest_s, work_s * limit_s / (limit_s - fixed_s)), floor_s)

    def banked_span_s(self, work_s: float, num_tokens: int) -> float:
        """prefill_span_s for a hurried prompt where decode-only steps can bank slack: its chunks,
        BANKED_CHUNK_TOKENS at a time, each paying a lone chunk's fixed cost, run in the time the
        decode-only steps leave (inf where they cannot bank)."""
        if self._banking_decode_share is None:
            return math.inf
        num_chunks = math.ceil(num_tokens / BANKED_CHUNK_TOKENS)
        return (work_s + num_chunks * self._banked_chunk_fixed_s()) / (1.0 - self._banking_decode_share)

    def _banked_chunk_fixed_s(self) -> float:
        """A BANKED_CHUNK_TOKENS chunk's step alone, less its tokens' own work (_prefill_work):
        the overhead, and the layer-by-layer path's per-step cost or the one-call path's per-token
        one, whichever such a step pays."""
        chunk_s = self.cost_model.linear_s(StepFeatures.of_chunk(0, BANKED_CHUNK_TOKENS, False))
        return chunk_s - sum(self._prefill_parts_s(0, BANKED_CHUNK_TOKENS))

    def _span_to_deadline_s(self, work_s: float, num_tokens: int, scale: float, left_s: float) -> tuple[float, bool]:
        """(the scaled span of prefill work due before a deadline left_s away, whether the prompt
        hurries): at the bound's pace, or where that would take more than HURRY_PRESSURE of the
        time left, the banked pace where shorter."""
        span_s = scale * self.prefill_span_s(work_s, num_tokens)
        if span_s <= HURRY_PRESSURE * left_s:
            return span_s, False
        banked_s = scale * self.banked_span_s(work_s, num_tokens)
        return (banked_s, True) if banked_s < span_s else (span_s, False)

    def _prefill_work(self, num_computed_tokens: int, num_tokens: int) -> tuple[float, int]:
        """(seconds of compute, tokens) of prefilling tokens [c, c + n) of a prompt in small
        chunks: each token's layers, and its attention to every key before it (a token late in a
        long prompt costs several times one at its start)."""
        return sum(self._prefill_parts_s(num_computed_tokens, num_tokens)), num_tokens

    def _prefill_parts_s(self, num_computed_tokens: int, num_tokens: int) -> tuple[float, float]:
        """_prefill_work's seconds as (the layers, attention): levels scale them apart."""
        w = self.cost_model.coefficients
        c, n = num_computed_tokens, num_tokens
        return w.per_scheduled_token_s * n, w.per_prefill_attention_pair_s * n * (2 * c + n) / 2

    def _attention_share(self, request: Request) -> float:
        """The share of what is left of a prompt's full-model prefill that is attention."""
        layers_s, attention_s = self._prefill_parts_s(request.num_computed_tokens, request.num_tokens_to_compute)
        return attention_s / (layers_s + attention_s) if layers_s + attention_s > 0 else 0.0

    def _fixed_step_s(self) -> float:
        """A step's time that does not grow with its prefill tokens: overhead, the running decodes
        and one prefill chunk's own cost."""
        if self._fixed_for is not self._decode_features:  # PERF: once a step, not once a prompt
            self._fixed_for = self._decode_features
            self._fixed_s = self.cost_model.linear_s(self._decode_features + _ONE_CHUNK)
        return self._fixed_s

    def request_prefill_work(self, request: Request) -> tuple[float, int]:
        """What the request's prefill still needs (_prefill_work), at the full model: a pruned
        prompt's deep layers run only the kept share (KnobCosts.keep_fraction)."""
        work_s, tokens = self._prefill_work(request.num_computed_tokens, request.num_tokens_to_compute)
        return work_s * self._keep_fraction(request, lowest=False), tokens

    def _keep_fraction(self, request: Request, lowest: bool) -> float:
        """A prefill's time at the request's prompt_keep over the whole prompt's, or (lowest) at
        the smallest keep it may still take (an auto keep whose prefill has not started)."""
        if self.choice is None:
            return 1.0
        keep = request.prompt_keep
        if lowest and _keep_open(request):
            keep = min(request.keep_options)
        return self.choice.costs.keep_fraction(keep)

    # ---- elastic settings (engine/scheduler/elastic_choice.py) ---------------------------------

    def prepare_step(self, running: Sequence[Request], waiting: Sequence[Request], now: float) -> None:
        """Learn from first tokens that came; find the prompts that hurry; choose this step's open
        prompt_keeps and level for the requests that leave them to the server."""
        self._observe_first_tokens()
        self._lost_at = -math.inf  # requests changed since the last step, even at the same time
        ttft_pressure, attention_share = self._walk_prompts_due(running, waiting, now)
        auto = [] if self.choice is None else [r for r in (*running, *waiting) if r.elastic_auto]
        if auto:
            self.choice.choose_level(self.decode_pressure(running), ttft_pressure,
                                     self.load_pressure(now, KEEP_LADDER[-1], LEVEL_UTILIZATION), attention_share,
                                     self.load_pressure(now, 1.0, LEVEL_UTILIZATION))
            for request in auto:
                request.elastic_level = self._level_of(request, now)
        self._prompt_level = max((r.elastic_level for r in (*running, *waiting) if phase(r) != 0), default=None)

    def _level_of(self, request: Request, now: float) -> int:
        """An auto request's level this step: the chosen one within its floor, the decodes' own
        for a request decoding (under a load the full model serves, a prompt's TTFT pressure does
        not take the decodes beside it down: ElasticChoice.choose_level); a prompt whose TTFT
        target is lost runs at its floor (its quality no longer buys it a met target, and the time
        it frees goes to prompts that can still meet theirs)."""
        decoding = phase(request) == 0
        if not decoding and self._is_lost(request, now):
            return self.choice.lowest_level(request.min_level)
        return self.choice.level_for(request.min_level, decoding)

    def decode_pressure(self, running: Sequence[Request]) -> float:
        """The predicted full-model step of the running decodes over the tightest of their TPOT
        targets, with its safety margin (prefill chunks fit in what is left: token_budget)."""
        decodes = [r for r in running if phase(r) == 0][:self.max_num_seqs]
        tpot_targets = [t for t in (self.target(r).tpot_s for r in decodes) if t is not None]
        if not tpot_targets:
            return 0.0
        return self.cost_model.predict_s(_decode_features(decodes)) / (min(tpot_targets) * TPOT_SAFETY)

    def _walk_prompts_due(self, running: Sequence[Request], waiting: Sequence[Request],
                          now: float) -> tuple[float, float]:
        """One pass over the prompts still to prefill, in deadline order (the work due before
        each), that does three things and returns the TTFT pressure and the share of the work due
        that is attention (what a level saves of it depends on that share):

        - every auto prompt_keep still open (its prefill not started) is chosen again against the
          queue as it is now: the one chosen on arrival assumed the queue of then, and a document
          that waits behind prompts that came later with tighter deadlines, or behind more work
          than predicted, would otherwise start its whole prompt too late; a lost prompt takes
          its smallest keep;
        - the prompts that hurry this step (HURRY_PRESSURE);
        - the TTFT pressure: max over those prompts of the full-model prefill time due up to and
          including each (calibrated: first_token_ratio; at the banked pace where it hurries) over
          the time left to its deadline.
        O(n log n) a step, not a first-token prediction per request."""
        pressure, work_s, tokens, attention_s = 0.0, 0.0, 0, 0.0
        self._hurried = set()
        for request in self._prompts_due(running, waiting, now):
            if self.choice is not None and _keep_open(request):
                self._choose_keep_after(request, work_s, tokens, now)
            request_work_s, request_tokens = self.request_prefill_work(request)
            work_s, tokens = work_s + request_work_s, tokens + request_tokens
            attention_s += request_work_s * self._attention_share(request)
            left_s = self.deadline(request) - now
            span_s, hurried = self._span_to_deadline_s(work_s, tokens, self.first_token_ratio, left_s)
            if hurried or _at_window(request):
                self._hurried.add(request.request_id)
            pressure = max(pressure, span_s / left_s)
        if self.choice is not None:
            for request in waiting:
                if _keep_open(request) and self._is_lost(request, now):
                    request.choose_prompt_keep(min(request.keep_options))
        return pressure, attention_s / work_s if work_s > 0 else 0.0

    def _prompts_due(self, running: Sequence[Request], waiting: Sequence[Request], now: float) -> list[Request]:
        """Prompts still to prefill whose TTFT target can still be met, in deadline order.  Lost
        ones do not count: they are served after these, and would pin the level down."""
        return sorted((r for r in (*running, *waiting) if phase(r) != 0 and math.isfinite(self.deadline(r))
                       and not self._is_lost(r, now)), key=self.deadline)

    def _choose_prompt_keep(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                            now: float) -> None:
        """An auto prompt_keep on arrival: the largest whose predicted first token, at the level
        auto requests run at now, meets the TTFT target."""
        self._choose_keep_after(request, *self._prefill_due_before(request, waiting, running, now), now)

    def _choose_keep_after(self, request: Request, due_work_s: float, due_tokens: int, now: float) -> None:
        """The largest keep whose predicted first token, after `due_work_s` seconds of prefill
        compute over due_tokens tokens are served first, meets the request's TTFT target, and
        which the load allows (load_pressure: past KEEP_UTILIZATION of the full model, prompts are
        pruned to what would bring it back under; the quality table ranks keeps far above levels)."""
        left_s = self.deadline(request) - now
        scale = self._prefill_fraction(request, lowest=False) * self.first_token_ratio
        def fits(keep: float) -> bool:
            request.choose_prompt_keep(keep)
            if self.load_pressure(now, keep, KEEP_UTILIZATION) > 1.0:
                return False
            own_work_s, own_tokens = self.request_prefill_work(request)
            return self._span_to_deadline_s(due_work_s + own_work_s, due_tokens + own_tokens, scale, left_s)[0] <= left_s

        keep, _ = self.choice.choose_keep(fits, request.min_prompt_keep, tuple(request.keep_options))
        request.choose_prompt_keep(keep)

    def _prefill_fraction(self, request: Request, lowest: bool) -> float:
        """A prefill's time at the request's level over the full model's: at the level the choice
        gives it now, or (lowest) at the narrowest it may fall to; 1 for a fixed level."""
        if self.choice is None or not request.elastic_auto:
            return 1.0
        level = self.choice.lowest_level(request.min_level) if lowest else self.choice.level_for(request.min_level)
        return self.choice.costs.fraction(level, False, self._attention_share(request))

    def on_scheduled(self, scheduled: Sequence[ScheduledRequest], now: float) -> None:
        """Remember the step's full-model time, whole prompts, and the part of it that is the
        prefill of prompts whose keep is the server's to choose (load_pressure)."""
        if self.choice is None:
            return
        whole_s = self.cost_model.predict_s(features_of_scheduled(scheduled, _as_whole))
        fixed = [s for s in scheduled if s.num_scheduled_tokens == 1 or s.request.keep_options is None]
        prunable_s = 0.0
        if len(fixed) < len(scheduled):
            prunable_s = whole_s - self.cost_model.linear_s(features_of_scheduled(fixed, _as_whole))
        self._steps_run.append((now, whole_s, prunable_s))
        self._steps_run_s += whole_s
        self._steps_run_prunable_s += prunable_s

    def load_pressure(self, now: float, keep: float = 1.0, utilization: float = 1.0) -> float:
        """The full model's predicted time of the steps run over the last LOAD_WINDOW_S, whole
        prompts, with the prefills of prompts whose keep is auto at `keep` instead, over the
        window and `utilization`: above 1, the full model could not serve the load the engine
        served at that share of its time (measured on the steps, not on arrivals: it prices what
        decodes share a step with, and it follows the load whatever settings served it)."""
        while self._steps_run and self._steps_run[0][0] < now - LOAD_WINDOW_S:
            _, whole_s, prunable_s = self._steps_run.popleft()
            self._steps_run_s -= whole_s
            self._steps_run_prunable_s -= prunable_s
        saved_s = self._steps_run_prunable_s * (1.0 - self.choice.costs.keep_fraction(keep))
        return max(0.0, self._steps_run_s - saved_s) / (LOAD_WINDOW_S * utilization)

    # ---- first-token predictions, calibrated -------------------------------------------------

    def _predict_first_token(self, request: Request, eta_s: float, own_s: float) -> None:
        """Remember an admitted request's predicted first-token time (own_s: its own prefill's
        part), to learn from when it comes."""
        if not request.best_effort:
            self._first_token_predicted[request.request_id] = (request, eta_s, own_s)

    def _observe_first_tokens(self) -> None:
        came = sorted((r.metrics.first_token_time, request_id)
                      for request_id, (r, _, _) in self._first_token_predicted.items()
                      if r.metrics.first_token_time is not None)
        for first, request_id in came:  # in the order they came: each sees those before it
            request, eta_s, own_s = self._first_token_predicted.pop(request_id)
            hindsight_s = eta_s + self._served_before_s(request.arrival_time, first)
            self._first_tokens_served.append((request.arrival_time, first, own_s))
            if request.best_effort or eta_s <= 0:
                continue  # served last on purpose: says nothing of the predictions
            if own_s < FIRST_TOKEN_MIN_OWN_S:
                continue  # a step's granularity, not a rate (FIRST_TOKEN_MIN_OWN_S)
            w = FIRST_TOKEN_RATIO_WEIGHT
            self._first_token_measured_s += w * (first - request.arrival_time - self._first_token_measured_s)
            self._first_token_eta_s += w * (hindsight_s - self._first_token_eta_s)

    def _served_before_s(self, arrival: float, first_token: float) -> float:
        """The predicted own prefill time of requests that arrived after `arrival` and got their
        first token before `first_token`."""
        return sum(own_s for came, first, own_s in self._first_tokens_served if came > arrival and first < first_token)

    @property
    def first_token_ratio(self) -> float:
        """Measured over predicted first-token time of recent requests (1 before any came)."""
        if self._first_token_eta_s <= 0:
            return 1.0
        low, high = FIRST_TOKEN_RATIO_BOUNDS
        return min(high, max(low, self._first_token_measured_s / self._first_token_eta_s))

    def on_finished(self, request: Request) -> None:
        self._first_token_predicted.pop(request.request_id, None)

    # ---- budget ------------------------------------------------------------------------------

    def token_budget(self, running: Sequence[Request], max_budget: int, now: float) -> int:
        budget = self._token_budget(running, max_budget, now)
        num_decodes = self._decode_features.num_sampled_seqs
        self._last_step_s = self.cost_model.predict_s(
            self._decode_features + StepFeatures.of_chunk(0, budget - num_decodes, False))
        return budget

    def _token_budget(self, running: Sequence[Request], max_budget: int, now: float) -> int:
        decodes = [r for r in running if phase(r) == 0][:self.max_num_seqs]  # at most a step's worth
        paced = [r for r in decodes if self.target(r).tpot_s is not None]
        room = max_budget - len(decodes)
        self._decode_features = _decode_features(decodes)
        self._step_limit_s = self._slack_limit_s = self._decode_slack_s = self._banking_decode_share = None
        self._banking = False
        if not paced:
            return max_budget
        # Prefill tokens are fitted beside the decodes that must run this step; the others sit
        # the step out where the chunk leaves them no room (limit_chunk).
        due = _decode_features([r for r in paced if self._is_urgent(r, now)])
        # Mixed steps run longer than the fit predicts, by mixed_step_ratio.
        correction = TPOT_SAFETY / self.cost_model.mixed_step_ratio
        tightest_tpot_s = min(self.target(r).tpot_s for r in paced)
        self._step_limit_s = tightest_tpot_s * correction
        limits = [self._step_limit_s]
        widest = max(r.elastic_level for r in decodes)
        decode_only_s = self.cost_model.predict_s(self._decode_features) * self._level_fraction(widest, False)
        pace_s = DECODE_PACE * tightest_tpot_s
        chunks_bank = decode_only_s < BANKING_DECODE_SHARE * self._step_limit_s
        hurried_bank = decode_only_s < HURRY_DECODE_SHARE * pace_s
        if chunks_bank or hurried_bank:
            # Slack against each target's DECODE_PACE schedule: a margin over the whole request.
            self._decode_slack_s = ((min(self.next_token_due(r, DECODE_PACE) for r in paced) - now)
                                    / self.cost_model.mixed_step_ratio)
        if chunks_bank:
            self._slack_limit_s = self._decode_slack_s
            limits.append(self._decode_slack_s)
        if hurried_bank:
            self._banking_decode_share = decode_only_s / pace_s
            if self._hurried:
                limits.append(self._decode_slack_s)
        # Chunks priced at the widest prompt's level beside the decodes at theirs (limit_chunk
        # prices each chunk at its own request's).
        levels = StepLevels(widest, self._prompt_level or widest)
        due_s = self.cost_model.predict_s(due) if levels.is_mixed else 0.0
        prefill_tokens = max(self.cost_model.max_chunk_tokens(due, num_computed_tokens=0, max_tokens=room,
                                                              budget_s=self._full_budget_s(limit_s, due_s, levels))
                             for limit_s in limits)
        # A hurried prompt's chunk is at least BANKED_CHUNK_TOKENS (limit_chunk decides whether it runs).
        least = BANKED_CHUNK_TOKENS if self._hurried and self._banking_decode_share is not None else MIN_PREFILL_TOKENS
        return len(decodes) + min(room, max(prefill_tokens, least))

    def _level_fraction(self, level: int, with_chunk: bool) -> float:
        """A step's time at one `level` over the cost model's full-model prediction, as the knob
        costs have learned it (KnobCosts.fraction).  The TPOT bounds are real seconds and the
        cost model prices steps at the full model, so a step's prediction is held to bound /
        this.  Priced at the full model instead, a step at a narrower level was held to the full
        model's calibration, which the engine stops refining while steps run narrower
        (LLMEngine._observe_step: the level's fraction learns instead), and which a fixed
        narrower level never refines at all.  A step with a chunk is priced at the larger of its
        level's prefill fractions (its attention share is not known yet)."""
        if self.choice is None or level not in self.choice.costs.decode_fraction:
            return 1.0
        if not with_chunk:
            return self.choice.costs.fraction(level, True)
        return self.choice.costs.prefill_fraction_bound(level, None)

    def _full_budget_s(self, limit_s: float, decodes_full_s: float, levels: StepLevels) -> float:
        """What the full model may predict a step at for it to run within limit_s at these
        levels (KnobCosts.full_budget_s; decodes_full_s: its decodes' part)."""
        if self.choice is None or levels.widest not in self.choice.costs.decode_fraction:
            return limit_s
        return self.choice.costs.full_budget_s(limit_s, decodes_full_s, levels)

    def limit_chunk(self, request: Request, num_new: int, scheduled: Sequence[ScheduledRequest], now: float) -> int:
        """The most of num_new tokens whose chunk, at its position and beside what the step
        already holds, keeps the step within its TPOT bound.

        A decode ahead of its schedule sits the step out when its token would break the bound
        (it ranks after prefills, so a prefill chunk comes first: that is the point of a TPOT
        target being a rate); an urgent one always runs.  Before, every running decode ran every
        step and chunks were priced beside them all: with batch requests' decodes (a 1 s TPOT
        target) filling the step, a chat's 40 ms bound left a chunk late in a document no room,
        and the MIN_PREFILL_TOKENS fallback below then broke the bound every step (measured at
        1.5x load: chats' mean TPOT 46-49 ms against 42).

        Where the bound does not fit even MIN_PREFILL_TOKENS there (a chunk late in a long
        prompt attends to every key before it), the step's first chunk spends the slack the
        decodes have banked instead: it runs, as large as that slack allows, once decode-only steps
        (far shorter than the bound) have banked enough for MIN_PREFILL_TOKENS, and not before.
        The decodes' mean TPOT holds either way.  Where decode-only steps cannot bank slack the
        first chunk keeps MIN_PREFILL_TOKENS whatever it costs, so waiting work cannot starve,
        unless its own TTFT target is lost already: breaking decodes' targets for it would lose
        theirs too (measured at 1.5x load, such chunks were a third of the steps over the bound), so
        it takes what the bound leaves and moves on whenever no tight target is decoding.

        A hurried prompt (HURRY_PRESSURE) does not crawl: it runs at least BANKED_CHUNK_TOKENS or
        sits the step out, and every prompt with it, while the decodes bank slack (_hurried_chunk).
        So does a pruned prompt at its window (_at_window), whose one chunk left also runs every
        kept token through the deep layers: the slack is banked for what that chunk computes.
        Before, its plain 32 tokens late in a long prompt did not fit the bound beside the chats,
        it waited for slack that other prompts' chunks took first, and its target was lost
        (at 1.5x load under the floors, windows waited 4-10 s for a chunk of 0.15-0.4 s).

        A second chunk in a step gets at least MIN_PREFILL_TOKENS (or the rest of its prompt) or
        none: the budget's crumbs would pay a chunk's own cost for a token or two.

        A pruned prompt's chunk before its score window is priced at what it computes, the
        layers below the first prune layer (_PricedBeforeTheWindow), so it gets more tokens."""
        if self._step_limit_s is None:
            return num_new
        if phase(request) == 0 and self._is_urgent(request, now):
            return num_new  # (before pricing the step: every urgent decode asks, first)
        if phase(request) != 0 and self._banking:
            return 0  # a hurried prompt banks slack this step: no prompt runs (_hurried_chunk)
        base = features_of_scheduled(scheduled, _PricedBeforeTheWindow)
        has_chunk = any(s.num_scheduled_tokens > 1 for s in scheduled)
        levels = StepLevels.of(scheduled)
        if phase(request) == 0:
            own = StepFeatures.of_chunk(request.num_computed_tokens, 1, True)
            levels = StepLevels(max(levels.decode or 0, request.elastic_level), levels.chunk)
            decodes_s = self._decodes_full_s(scheduled, levels, own)
            return num_new if self.cost_model.predict_s(base + own) <= self._full_budget_s(
                self._step_limit_s, decodes_s, levels) else 0
        levels = StepLevels(levels.decode, max(levels.chunk or 0, request.elastic_level))
        decodes_s = self._decodes_full_s(scheduled, levels)
        return self._prefill_chunk(request, num_new, base, has_chunk,
                                   lambda limit_s: self._full_budget_s(limit_s, decodes_s, levels), now)

    def _decodes_full_s(self, scheduled: Sequence[ScheduledRequest], levels: StepLevels,
                        extra: StepFeatures = StepFeatures()) -> float:
        """The full model's prediction of the step's decodes (and `extra`), which pricing needs
        apart only where chunks and decodes run at different levels (0 elsewhere: unused)."""
        if not levels.is_mixed:
            return 0.0
        decodes = features_of_scheduled((s for s in scheduled if s.num_scheduled_tokens == 1), _PricedBeforeTheWindow)
        return self.cost_model.predict_s(decodes + extra)

    def _prefill_chunk(self, request: Request, num_new: int, base: StepFeatures, has_chunk: bool,
                       full_budget_s: Callable[[float], float], now: float) -> int:
        """limit_chunk for a prompt's chunk beside `base` (the step so far; has_chunk: whether it
        holds a chunk already); full_budget_s: a bound in seconds -> the full-model prediction
        the step may reach within it at its levels."""
        plan = request.prune_plan
        pricing = None if plan is None else _PricedBeforeTheWindow(plan)

        def legal(tokens: int) -> int:
            """A pruned prompt's chunk never ends inside its score window (PrunePlan.chunk_size)."""
            if plan is None or tokens >= num_new:
                return tokens
            return plan.chunk_size(request.num_computed_tokens, tokens, tokens)

        # At a pruned prompt's window the only chunk is the rest of it (with the deep layers' rows).
        minimum = legal(min(num_new, MIN_PREFILL_TOKENS)) or num_new

        def fitted(limit_s: float, priced_as: ChunkPlan | None = pricing) -> int:
            return legal(self.cost_model.max_chunk_tokens(base, request.num_computed_tokens, num_new, full_budget_s(limit_s),
                                                          samples_at=request.num_tokens_to_compute, plan=priced_as))

        tokens = fitted(self._step_limit_s)
        if has_chunk:  # beside another chunk: a chunk's worth or none, not the budget's or the bound's crumbs
            crumbs = tokens < minimum or num_new < min(request.num_tokens_to_compute, MIN_PREFILL_TOKENS)
            return 0 if crumbs else tokens
        if request.request_id in self._hurried and self._banking_decode_share is not None:
            if _at_window(request):  # its one chunk left: slack is banked for what it computes
                return self._hurried_chunk(tokens, num_new, lambda limit_s: fitted(limit_s, plan))
            return self._hurried_chunk(tokens, legal(min(num_new, BANKED_CHUNK_TOKENS)) or num_new, fitted)
        if tokens >= minimum:
            return tokens
        if self._slack_limit_s is None:
            return tokens if self._is_lost(request, now) else minimum
        tokens = fitted(self._slack_limit_s)
        return tokens if tokens >= minimum else 0

    def _hurried_chunk(self, tokens: int, wanted: int, fitted: Callable[[float], int]) -> int:
        """A hurried prompt's chunk (HURRY_PRESSURE): what the bound fits where that is at least
        `wanted` tokens, else what the decodes' banked slack fits where that is, else none: the
        step runs the decodes alone (no other prompt beside: it would spend the step's room) and
        banks slack.  Decode-only steps take under HURRY_DECODE_SHARE of the decodes' pace here,
        so slack grows every step and the prompt cannot starve."""
        if tokens >= wanted:
            return tokens
        banked = fitted(self._decode_slack_s)
        if banked >= wanted:
            return banked
        self._banking = True
        return 0

    # ---- admission ---------------------------------------------------------------------------

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                   now: float) -> None:
        target = self.target(request)
        if request.keep_options is not None and self.choice is not None:
            self._choose_prompt_keep(request, waiting, running, now)
        if target.ttft_s is not None:  # an auto level may fall to its floor to meet it
            modelled_s = self.first_token_eta_s(request, waiting, running, now)
            fraction = self._prefill_fraction(request, lowest=False)
            # The prediction runs from the arrival, as the first token is measured: the step in
            # flight when the request came, already waited, is no error of the rate model.
            waited_s = max(0.0, now - request.arrival_time)
            self._predict_first_token(request, waited_s + fraction * modelled_s,
                                      fraction * self.prefill_span_s(*self.request_prefill_work(request)))
            eta_s = self._prefill_fraction(request, lowest=True) * self.first_token_ratio * modelled_s
            if now + eta_s > self.deadline(request):
                self._refuse(request, TTFT_REJECT_REASON,
                             f"The TTFT target ({1000 * target.ttft_s:.0f} ms) cannot be met: about "
                             f"{1000 * eta_s:.0f} ms of prefill is due before this request.")
                return
        if target.tpot_s is not None:
            admitted = [r for r in (*waiting, *running) if not r.best_effort]
            demand, supply = self.decode_seat_demand([*admitted, request]), self.decode_seat_supply()
            if request.elastic_auto and self.choice is not None:  # it may run down to its floor
                supply /= self.choice.costs.fraction(self.choice.lowest_level(request.min_level), True)
            if demand > MAX_DECODE_SEAT_SHARE * supply:
                self._refuse(request, TPOT_REJECT_REASON,
                             f"The TPOT target ({1000 * target.tpot_s:.0f} ms) cannot be met: with it the "
                             f"admitted requests would need {demand:.0f} of the {supply:.0f} decode seats a "
                             "second this server has.")

    def _refuse(self, request: Request, reason: str, message: str) -> None:
        if self.config.best_effort:
            request.best_effort = True
            return
        raise AdmissionRejected(message + " Retry later or relax the target.", reason)

    def first_token_eta_s(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                          now: float) -> float:
        """Predicted time until the request's first token: every prefill due before it, and its
        own, at the steps this policy gives now (prefill_span_s; banked_span_s where it would
        hurry).  Seats are not the limit: decodes ahead of their TPOT schedule pause for prefills."""
        due_work_s, due_tokens = self._prefill_due_before(request, waiting, running, now)
        own_work_s, own_tokens = self.request_prefill_work(request)
        left_s = self.deadline(request) - now
        return self._span_to_deadline_s(own_work_s + due_work_s, own_tokens + due_tokens, 1.0, left_s)[0]

    def _prefill_due_before(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                            now: float) -> tuple[float, int]:
        """(seconds of compute, tokens) of the prefills due before the request's: deadline order,
        less the prompts already lost (they rank after every other, _is_lost).  Counted, a document
        whose target was lost made every document that came while it was served best effort:
        ranked last, behind it (1.5x load, floors: one waited 12 s against a 2 s target)."""
        deadline = self.deadline(request)
        due = [self.request_prefill_work(r) for r in (*waiting, *running)
               if phase(r) != 0 and self.deadline(r) <= deadline and r is not request and not self._is_lost(r, now)]
        return sum(w for w, _ in due), sum(n for _, n in due)

    def decode_seat_demand(self, requests: Sequence[Request]) -> float:
        """Seats a second the requests' TPOT targets need: one seat a token each."""
        return sum(1 / t for t in (self.target(r).tpot_s for r in requests) if t is not None)

    def decode_seat_supply(self) -> float:
        """Decode seats a second if every step were a full step of decodes (no prefill); admission
        lets TPOT targets claim MAX_DECODE_SEAT_SHARE of it and leaves the rest to prefills."""
        full_decode_step_s = self.cost_model.predict_s(features_of_chunks([(0, 1, True)] * self.max_num_seqs))
        return self.max_num_seqs / max(full_decode_step_s, 1e-6)


@dataclass(frozen=True)
class _PricedBeforeTheWindow:
    """How the TPOT bound prices a pruned prompt's chunks: before its score window at what they
    compute (the layers below the first prune layer: PrunePlan.layer_counts), the chunk that ends
    the prompt as a plain chunk of its tokens, though it also runs the kept rows through the deep
    layers.  Priced at what it computes, that chunk waited for banked slack: in an interleaved A/B
    at 1.5x load (72 requests, two pairs) auto attained 0.69 / 0.71 against 0.79 / 0.81 (documents
    0.50 / 0.42 against 0.63 / 0.67).  The cost model still learns every step at what it computed."""

    plan: PrunePlan

    def layer_counts(self, num_computed_tokens: int, num_scheduled_tokens: int) -> tuple[float, float, float]:
        end = num_computed_tokens + num_scheduled_tokens
        if end >= self.plan.num_prompt_tokens:
            return float(num_scheduled_tokens), float(end), float(num_scheduled_tokens * end)
        return self.plan.layer_counts(num_computed_tokens, num_scheduled_tokens)

    def widest_layer_counts(self, num_computed_tokens: int, num_scheduled_tokens: int) -> tuple[int, int]:
        return self.plan.widest_layer_counts(num_computed_tokens, num_scheduled_tokens)  # the runner's bounds


def _as_whole(plan: PrunePlan) -> None:
    """Pricing (features_of_scheduled) of a pruned prompt's chunks as the whole prompt's: no plan."""
    return None


def _at_window(request: Request) -> bool:
    """Whether a pruned prompt's next chunk can only be the rest of it: its score window, with
    the deep layers' rows of every kept token (PrunePlan.chunk_size)."""
    plan = request.prune_plan
    return plan is not None and plan.window_start <= request.num_computed_tokens < plan.num_prompt_tokens


def _keep_open(request: Request) -> bool:
    """Whether an auto prompt_keep may still change: its prefill has not started (nor, after a
    preemption, has it tokens out: a recomputed prompt keeps the plan it was served with)."""
    return request.keep_options is not None and request.num_computed_tokens == 0 and not request.output_token_ids


def _decode_features(decodes: Sequence[Request]) -> StepFeatures:
    return features_of_chunks((r.num_computed_tokens, 1, True) for r in decodes)
