"""Speculative decoding on the wafer (beyond the paper): a small draft model, placed on PEs
the target model leaves idle, proposes ``k`` tokens; the target checks them all in one
decode step and keeps the longest prefix it agrees with, plus a token of its own.

Why it pays on a wafer: a decode step is bound by its collectives (the K-tree reduces of
every GEMV), not by its products, so a step that carries k+1 tokens (a verification pass,
``WaferModel.verify``) costs little more than one carrying a single token, while a draft a
tenth the target's size decodes a token in a fraction of the target's step.

One round, from the last token ``t`` the request emitted:

1. the draft decodes ``t`` (and a token of the previous round it has not seen), then its own
   guesses: k tokens ``d1..dk`` (k draft steps, on the draft's regions), each its argmax, or
   with rejection sampling (below) drawn from its distribution q;
2. the k tokens cross the wafer to the target's first decode region;
3. the target verifies ``[t, d1..dk]`` in one step: every layer appends them to the KV cache
   in order, each attending over the cache up to itself, so the logits after ``d_i`` are
   exactly what decoding ``d_i`` alone would give;
4. the caller picks a token from the logits after ``t``, then after ``d1`` while it picked
   ``d1``, and so on: tokens agreeing with the draft cost nothing more; the first that differs
   ends the round, both caches drop the rejected drafts (``KVCache.rollback``) and a new round
   starts from it. All k accepted: the logits after ``dk`` give one more token.

How the caller picks (``SpeculativeConfig.acceptance_method``):

* ``exact``: the draft guesses its argmax and the caller samples from the target's logits as
  without a draft; a guess counts when the sample equals it. Every token is drawn from the
  target's own logits for its prefix with the request's generator in the same order, so a
  seed gives the same tokens with and without a draft, up to the verification pass's
  rounding (its logprobs differ from a lone step's by ~1e-3, so a draw that lands that close
  to the edge between two tokens, most often two unlikely ones, takes the other).
* ``rejection`` (the default, as in vLLM): the draft draws each guess from its distribution q,
  processed as the request asks (temperature, top-k, top-p) with the request's generator;
  the caller's sampler keeps it with probability min(1, p/q), p the target's processed
  distribution, and at the first rejection draws from normalize(max(0, p - q))
  (``sampling.accept_or_resample``). The tokens are distributed as sampling from the target
  alone, a seed repeats them, and a draft is kept with probability sum(min(p, q)) rather
  than p(the draft's argmax): usually more drafts taken when sampling (not when a draft far
  flatter than the target has the target's likeliest token as its own).

Both reduce to the same greedy decoding at temperature 0: the draft's argmax, kept when it
is the target's (so the same tokens as without a draft, but at a near-tie of the top two
logits, which the verification pass's summation order may break the other way). The
sampling is host-side: the wafer runs the same draft steps and passes either way.

Placement: the draft's regions (both its phases) meet none of the target's regions of
either phase, so the draft's weights stay where they are while the target moves its own
between its prefill and decode layouts, and the draft's prefill runs beside the target's.

Time: both models' ledgers price their own steps; a round's time is the draft's steps,
the hand-offs (``charge_move`` between the two regions), the verification and the
rollbacks, one after another. Energy: both models' events, and the wafer's static power
for the request's time.

Shape-only predictions (no values, so no tokens to compare) take an assumed per-token
acceptance probability: each draft is accepted with that probability, independently,
until the first rejection (a seeded draw, so predictions repeat).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from waferllm.engine.metrics import energy, phase_cycles, request_counters, request_metrics
from waferllm.engine.placement import region_slots
from waferllm.engine.run_config import RunConfig
from waferllm.engine.tuner import candidate_grids
from waferllm.engine.wafer import WaferModel
from waferllm.errors import PlacementError, RequestError
from waferllm.hardware.plmr import DTYPE_BYTES
from waferllm.mesh.ledger import COUNTERS
from waferllm.mesh.move import Placement, charge_move

#: how many draft tokens a round proposes at most (each is one more row in the verification pass)
MAX_SPECULATIVE_TOKENS = 16
#: how a sampled request keeps drafts (see the module's docstring)
ACCEPTANCE_METHODS = ("rejection", "exact")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a request is decoded speculatively.

    Attributes:
        num_speculative_tokens: drafts per round (k).
        draft_layers: a self-speculative draft: the target's first N layers, its final norm
            and LM head (no other weights needed). Exclusive with ``draft_model``.
        draft_model: another model with the target's vocabulary (a GGUF file or HF
            directory; a preset name for shape-only predictions).
        draft_grid: side of the draft's square regions (both phases); None: the target's
            decode grid, or the largest that fits beside the target.
        acceptance: shape-only predictions: the probability that the target accepts each draft.
        draft_ahead: while the target verifies a round, the draft drafts the next one as if
            every draft were taken and the target's own next token were the draft's guess;
            when both hold, the next round starts with its drafts ready.
        acceptance_method: how a sampled request keeps drafts: ``rejection`` (the draft samples,
            rejection sampling keeps the target's distribution; more drafts taken) or ``exact``
            (the draft's argmax kept when the target's own sample is it; a seed gives the tokens
            of a run without a draft, up to the verification pass's rounding). Greedy requests
            decode alike with either.
    """

    num_speculative_tokens: int = 4
    draft_layers: int | None = None
    draft_model: object = None
    draft_grid: int | None = None
    acceptance: float | None = None
    draft_ahead: bool = False
    acceptance_method: str = "rejection"

    def __post_init__(self):
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise RequestError(f"num_speculative_tokens must be an integer from 1 to {MAX_SPECULATIVE_TOKENS}, "
                               f"got {k!r}")
        if (self.draft_layers is None) == (self.draft_model is None):
            raise RequestError("speculative decoding needs a draft: give draft_layers (the target's first N layers) "
                               "or draft_model (a model with the target's vocabulary), not both")
        dl = self.draft_layers
        if dl is not None and (isinstance(dl, bool) or not isinstance(dl, (int, np.integer)) or dl < 1):
            raise RequestError(f"draft_layers must be a positive integer, got {dl!r}")
        g = self.draft_grid
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1):
            raise RequestError(f"draft_grid must be a positive integer, got {g!r}")
        a = self.acceptance
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise RequestError(f"acceptance must be a probability from 0 to 1, got {a!r}")
        if self.acceptance_method not in ACCEPTANCE_METHODS:
            raise RequestError(f"acceptance_method must be one of {', '.join(ACCEPTANCE_METHODS)}, "
                               f"got {self.acceptance_method!r}")

    @classmethod
    def coerce(cls, value) -> "SpeculativeConfig | None":
        """From a dict of its fields (vLLM's ``speculative_config``), itself, or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            names = ", ".join(f.name for f in dataclasses.fields(cls))
            raise RequestError(f"speculative_config must be a dict of {names}"
                               f", got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RequestError(f"unknown speculative_config field(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        return cls(**value)


# ---------------------------------------------------------------------------- the draft


def first_layers(config, weights, n: int):
    """A self-speculative draft: the target's first ``n`` layers with its final norm and LM
    head (config, weights; the weights share the target's arrays)."""
    if not 1 <= n < config.num_layers:
        raise RequestError(f"draft_layers must be from 1 to {config.num_layers - 1} ({config.name} has "
                           f"{config.num_layers} layers), got {n}")
    cfg = dataclasses.replace(config, name=f"{config.name}[:{n}]", num_layers=n)
    w = None if weights is None else dataclasses.replace(weights, config=cfg, layers=list(weights.layers[:n]))
    return cfg, w


def check_vocabularies(target, draft) -> None:
    if draft.vocab_size != target.vocab_size:
        raise RequestError(f"the draft {draft.name} has a vocabulary of {draft.vocab_size} tokens and the target "
                           f"{target.name} one of {target.vocab_size}: a draft must share the target's tokenizer")


def free_rectangles(wafer, taken: list) -> list[tuple[int, int, int, int]]:
    """The maximal rectangles (row, col, rows, cols) of the wafer that no ``taken`` region
    touches, those holding the largest square first (then the largest). A maximal empty
    rectangle has its edges on the wafer's or the regions' edges, so those coordinates give
    every candidate; the maximal ones are those no other free candidate contains."""
    ys = sorted({0, wafer.rows} | {e for r in taken for e in (r.row0, r.row0 + r.rows)})
    xs = sorted({0, wafer.cols} | {e for r in taken for e in (r.col0, r.col0 + (r.span or r.cols))})
    y0, y1 = np.array(ys)[:, None], np.array(ys)[None, :]
    x0, x1 = np.array(xs)[:, None], np.array(xs)[None, :]
    rows = np.argwhere(y0 < y1)  # every (top, bottom) pair, then every (left, right)
    cols = np.argwhere(x0 < x1)
    top, bottom = np.array(ys)[rows[:, 0]][:, None], np.array(ys)[rows[:, 1]][:, None]
    left, right = np.array(xs)[cols[:, 0]][None, :], np.array(xs)[cols[:, 1]][None, :]
    clear = np.ones((len(rows), len(cols)), bool)
    for r in taken:  # a handful of regions
        clear &= ~((top < r.row0 + r.rows) & (r.row0 < bottom) & (left < r.col0 + (r.span or r.cols))
                   & (r.col0 < right))
    i, j = np.nonzero(clear)
    r = np.stack([top[i, 0], left[0, j], bottom[i, 0], right[0, j]], axis=1)  # (n, 4): top, left, bottom, right
    inside = ((r[None, :, 0] <= r[:, None, 0]) & (r[None, :, 1] <= r[:, None, 1]) & (r[None, :, 2] >= r[:, None, 2])
              & (r[None, :, 3] >= r[:, None, 3]))  # [a, b]: a lies within b
    np.fill_diagonal(inside, False)
    rects = [(int(t), int(l), int(b - t), int(rt - l)) for t, l, b, rt in r[~inside.any(axis=1)]]
    return sorted(rects, key=lambda x: (-min(x[2], x[3]), -x[2] * x[3], x))


def draft_plan(config, wafer, run: RunConfig, rect: tuple[int, int, int, int]):
    """The draft's placement plan inside the free rectangle ``rect``: planned as on a wafer of
    the rectangle's size (the same PEs, SRAM and fabric), its regions then put where the
    rectangle lies."""
    r0, c0, h, w = rect
    plan = run.plan(config, wafer.replace(rows=h, cols=w), suggest=False)

    def moved(pp, phase):
        return dataclasses.replace(pp, stages=[dataclasses.replace(st, region=dataclasses.replace(
            st.region, wafer=wafer, row0=st.region.row0 + r0, col0=st.region.col0 + c0,
            name=f"draft {phase}[{i}]")) for i, st in enumerate(pp.stages)])
    return dataclasses.replace(plan, wafer=wafer.name, **{ph: moved(getattr(plan, ph), ph)
                                                          for ph in ("prefill", "decode") if getattr(plan, ph)})


def place_draft(config, weights, target: WaferModel, grid: int | None = None, mode: str = "numeric",
                progress=None) -> WaferModel:
    """The draft model placed beside ``target`` on PEs neither of its phases uses (both of the
    draft's phases, so its prefill runs beside the target's), run as the target's run says
    (datatype, weights format, algorithms, context) on ``grid`` x ``grid`` regions. Default
    grid: the largest that plans in a free rectangle, up to the target's decode grid; a grid
    that does not fit is refused with one that does (checked by planning it)."""
    if target.cluster is not None:
        raise RequestError("speculative decoding runs on one wafer: the draft goes on the target's idle PEs")
    wafer = target.wafer
    if wafer.defective_pes:
        raise RequestError(f"speculative decoding places its draft on a perfect wafer; {wafer.name} has "
                           f"{len(wafer.defective_pes)} defective PEs")
    check_vocabularies(target.config, config)
    taken = [st.region for pp in (target.plan.prefill, target.plan.decode) if pp for st in pp.stages]
    # the draft's own passes take the tokens it has not seen with the round's first: two rows
    base = target.run.replace(layers=None, max_num_seqs=1, speculative_tokens=1)
    rects = free_rectangles(wafer, taken)[:8]
    found = _fit(config, wafer, base, rects, [grid] if grid is not None else None, target.plan.decode.grid)
    if found is None:
        fits = _fit(config, wafer, base, rects, None, max(wafer.rows, wafer.cols)) if grid is not None else None
        used = np.zeros((wafer.rows, wafer.cols), bool)
        for r in taken:
            used[r.row0:r.row0 + r.rows, r.col0:r.col0 + (r.span or r.cols)] = True
        free = int((~used).sum())
        advice = (f"; a {fits[1].decode.grid}x{fits[1].decode.grid} draft grid fits (checked by planning it)" if fits
                  else "; no draft grid fits: a smaller draft, or target grids that leave more PEs idle")
        raise PlacementError(f"the draft {config.name} does not fit on the {free:,} PEs {target.config.name}'s "
                             f"regions leave idle on {wafer.name}" + (f" with {grid}x{grid} regions" if grid else "")
                             + advice + " (a target on smaller grids, e.g. its prefill on its decode grid, leaves "
                             "more)", draft=config.name, fit_grid=fits[1].decode.grid if fits else None)
    g, plan = found
    return WaferModel(config, weights, wafer, base.with_grids(g, g), mode=mode, plan=plan, progress=progress)


def _fit(config, wafer, run: RunConfig, rects: list, grids: list[int] | None, start: int):
    """(grid, plan) of the largest grid that plans in the first of ``rects`` (ordered by the
    square they hold) where any does."""
    for rect in rects:
        side = min(rect[2], rect[3])
        for g in grids or _draft_grids(wafer, min(start, side)):
            if g > side:
                continue
            try:
                return g, draft_plan(config, wafer, run.with_grids(g, g), rect)
            except PlacementError:
                continue
    return None


def _draft_grids(wafer, start: int) -> list[int]:
    """Draft grids to try, ``start`` first, then smaller ones (a draft is the smaller model)."""
    return [start] + sorted((g for g in candidate_grids(wafer, hi=start) if g < start), reverse=True)


# ---------------------------------------------------------------------------- decoding


def _tokens_at(region, n: int) -> Placement:
    """``n`` token ids (fp32 words) on a region's first PE: where a decode step picks its token."""
    return Placement(region, (1, n), y_dim=0, y_of=np.zeros(1, np.int64), x_dim=1, x_of=np.zeros(n, np.int64))


class SpeculativeBackend:
    """The backend protocol (``reset``, ``prefill``, ``decode``, ``request_metrics``) over a
    target and a draft model: each ``decode(token)`` returns the target's logits for the
    token's successor, from a verification pass already run when the token is the draft's
    guess, else from a new round (see the module's docstring). One request at a time; with
    ``use_sampler`` (after ``reset``) the request's sampler draws the draft's guesses and
    verifies them, by ``acceptance_method``."""

    def __init__(self, target: WaferModel, draft: WaferModel, k: int, ahead: bool = False,
                 acceptance_method: str = "rejection"):
        if target.mode != draft.mode:
            raise RequestError("the target and the draft must run in the same mode (numeric or dry)")
        if acceptance_method not in ACCEPTANCE_METHODS:
            raise RequestError(f"acceptance_method must be one of {', '.join(ACCEPTANCE_METHODS)}, "
                               f"got {acceptance_method!r}")
        self.target, self.draft, self.k = target, draft, int(k)
        # draft the next round while the target verifies (the draft's PEs are its own)
        self.ahead = bool(ahead)
        self.acceptance_method = acceptance_method
        self.config, self.wafer, self.mode = target.config, target.wafer, target.mode
        self.reset()

    # what the front ends read of a backend
    @property
    def max_seq_len(self) -> int:
        return self.target.max_seq_len

    @property
    def plan(self):
        return self.target.plan

    @property
    def run(self) -> RunConfig:
        return self.target.run

    @property
    def ledger(self):
        """The target's ledger (its trace holds the hand-offs too; the draft keeps its own)."""
        return self.target.ledger

    @property
    def placement_wall_s(self) -> float:
        return self.target.placement_wall_s + self.draft.placement_wall_s

    def reset(self) -> None:
        self.target.reset()
        self.draft.reset()
        self.sampler = None  # the request's, when it samples the draft's guesses (use_sampler)
        # (draft, the target's logits after it, the draft's q it was drawn from or None)
        self._verified: list[tuple[int | None, np.ndarray | None, np.ndarray | None]] = []
        self._unseen: list = []  # emitted tokens the draft's cache does not hold yet
        # drafted ahead during the last verification: the draft's guess of the target's next
        # token, its drafts after that guess, and how many entries they added to its cache
        self._ahead: dict | None = None
        self._ahead_hit: bool | None = None  # shape-only runs: whether the guess is the token
        self.ahead_hits = 0
        self.hidden_cycles = 0.0  # draft work done while the target verified
        self.emitted = 0  # tokens the request has emitted (the first from the prefill)
        self.rounds = self.drafted = self.accepted = self.rejected = 0
        self.prompt_len = 0
        self.cycles = dict.fromkeys(("draft", "verify", "rollback", "handoff"), 0.0)

    def use_sampler(self, sampler) -> None:
        """The request's sampler (``sampling.Sampler``): with rejection sampling it draws the
        draft's guesses (its processing, its generator) and verifies each against the target's
        logits; with exact match, or greedy, it is not needed."""
        self.sampler = sampler

    @property
    def sampling_drafts(self) -> bool:
        """Whether the draft samples its guesses for rejection sampling (else: its argmax)."""
        return (self.acceptance_method == "rejection" and self.sampler is not None
                and not self.sampler.params.greedy)

    def prefill(self, token_ids, prompt_logits: bool = False):
        """Both models take the prompt, each on its own PEs at the same time; the target's
        logits pick the first token."""
        self.draft.prefill(token_ids)
        out = self.target.prefill(token_ids, prompt_logits)
        self.prompt_len = self.target.positions[0]
        self.emitted = 1
        return out

    def decode(self, token) -> np.ndarray | None:
        """The target's logits after ``token`` (the one just emitted)."""
        if self._verified and (self.mode == "dry" or int(token) == self._verified[0][0]):
            self.accepted += 1
            self.emitted += 1
            logits = self._verified.pop(0)[1]
        else:
            ready = self._settle(token)
            self.emitted += 1
            logits = self._round(token, ready)
        if self.sampling_drafts:  # the sampler verifies the next draft against these logits
            guess, _, q = self._verified[0] if self._verified else (None, None, None)
            self.sampler.propose(guess, q)
        return logits

    def _settle(self, token=None) -> list | None:
        """The caller's token is not the next draft (or no drafts are left): drop the drafts
        still verified but not taken from both caches; the draft's cache keeps what was taken.
        With drafting ahead: the drafts made for ``token`` when it is the draft's guess (all of
        the round taken), else the draft drops them too."""
        rejected, ahead = len(self._verified), self._ahead
        self._ahead = None
        extra = ahead["extra"] if ahead else 0
        if rejected:
            self.rejected += 1  # the next draft was examined and not taken; the rest were not examined
            self._timed("rollback", self.target, lambda: self.target.rollback(0, rejected))
            # the draft holds every draft but its last (and what it drafted ahead); it keeps those taken
            self._timed("rollback", self.draft, lambda: self.draft.rollback(0, rejected - 1 + extra))
            self._verified, self._unseen = [], []
            return None
        if ahead is None:
            return None
        hit = self._ahead_hit if self.mode == "dry" else token is not None and int(token) == ahead["guess"]
        if hit:
            self.ahead_hits += 1
            return ahead["drafts"]  # in the draft's cache but the last, which stays unseen
        # the guess was wrong: the draft keeps the round's last draft, which it took ahead
        self._timed("rollback", self.draft, lambda: self.draft.rollback(0, extra - 1))
        self._unseen = []
        return None

    def _round(self, token, drafts: list | None = None) -> np.ndarray | None:
        """Draft up to k tokens after ``token`` (or take ``drafts`` made ahead; (token, q) each),
        verify them, return the logits after ``token``."""
        t, d = self.target, self.draft
        if drafts is None:
            room = t.max_seq_len - t.positions[0] - 1  # the pass holds token and the drafts
            k = max(0, min(self.k, room, d.max_seq_len - d.positions[0] - len(self._unseen) - 1))
            drafts = self._draft(token, k)
        window = self.target.ledger.cycles
        if drafts:
            self._hand_off(d, t, len(drafts))
        logits = self._timed("verify", t, lambda: t.verify(0, [token] + [g for g, _ in drafts]))
        self.rounds += 1
        self.drafted += len(drafts)
        self._hand_off(t, d, 1)  # the draft learns how far the target went (a token id)
        rows = [None] * (len(drafts) + 1) if logits is None else list(logits)
        self._verified = [(g, row, q) for (g, q), row in zip(drafts, rows[1:])]
        if self.ahead and drafts:
            self._draft_ahead(self.target.ledger.cycles - window)
        return rows[0]

    def _draft_ahead(self, window: float) -> None:
        """While the drafts cross, the target verifies them and its answer comes back
        (``window`` cycles), the draft goes on as if all were taken: its guess of the target's
        own next token, then the next round's drafts after that guess. Only the part of its
        work longer than the window is on the critical path."""
        t, d = self.target, self.draft
        m = min(self.k, t.max_seq_len - t.positions[0] - 1, d.max_seq_len - d.positions[0] - 2)
        if m < 1:
            return
        before = phase_cycles(d).decode
        # from the round's last draft; the guess of the target's own token is the draft's argmax
        # even when sampling: it is no proposal, and the likeliest token is hit most often
        out = self._draft_steps(self._unseen, m + 1, argmax_first=True)
        spent = phase_cycles(d).decode - before
        self.cycles["draft"] += max(0.0, spent - window)
        self.hidden_cycles += min(spent, window)
        self._ahead = {"guess": out[0][0], "drafts": out[1:], "extra": m + 1}
        self._unseen = [out[-1][0]]

    def _draft(self, token, k: int) -> list:
        """k drafts after ``token``, (token, q) each (the draft first takes the tokens it has not
        seen, in the same step); the last draft stays unseen by the draft."""
        feed = self._unseen + [token]
        if not k:
            self._unseen = feed
            return []
        out = self._timed("draft", self.draft, lambda: self._draft_steps(feed, k))
        self._unseen = [out[-1][0]]
        return out

    def _draft_steps(self, feed: list, n: int, argmax_first: bool = False) -> list:
        """``n`` draft steps, the first on ``feed`` (several tokens: one pass), each next on the
        token before: the (token, q) each picks, q the distribution it was drawn from when the
        draft samples (None when it takes its argmax; token None in a dry run)."""
        d, out = self.draft, []
        for i in range(n):
            logits = d.verify(0, feed) if len(feed) > 1 else d.decode(feed[0])
            if logits is None:
                out.append((None, None))
            else:
                row = np.asarray(logits).reshape(len(feed), -1)[-1]
                sample = self.sampling_drafts and not (argmax_first and i == 0)
                out.append(self.sampler.draft(row) if sample else (int(np.argmax(row)), None))
            feed = [out[-1][0]]
        return out

    def _hand_off(self, src: WaferModel, dst: WaferModel, n: int) -> None:
        """``n`` token ids from where ``src`` picks its tokens to where ``dst`` embeds them."""
        led = self.target.ledger
        mark = led.mark()
        charge_move(led, _tokens_at(src.decode_stages[0].mesh.region, n),
                    _tokens_at(dst.decode_stages[0].mesh.region, n), DTYPE_BYTES["fp32"], name="speculative.handoff")
        self.cycles["handoff"] += led.since(mark)["cycles"]  # the move and its task switch

    def _timed(self, what: str, model: WaferModel, fn):
        before = phase_cycles(model).decode
        out = fn()
        self.cycles[what] += phase_cycles(model).decode - before
        return out

    # ------------------------------------------------------------------------ shape only
    def run_dry(self, input_len: int, output_len: int, acceptance: float, seed: int = 0) -> None:
        """A request of ``input_len`` prompt and ``output_len`` generated tokens, shape-only:
        each draft is taken with probability ``acceptance`` until the first rejection."""
        if self.mode != "dry":
            raise RequestError("run_dry predicts shape-only runs; a numeric run decodes real tokens")
        rng = np.random.default_rng(seed)
        self.reset()
        self.prefill(input_len)
        while self.emitted < output_len:
            if self._verified and rng.random() < acceptance:
                self.decode(None)  # the next draft is the token picked: its logits are ready
            else:
                if self._verified:
                    self._settle()  # rejected: a new round from the target's own token
                elif self._ahead is not None:  # all taken: is the target's own next token the guess made ahead?
                    self._ahead_hit = rng.random() < acceptance
                self.decode(None)

    # ------------------------------------------------------------------------ figures
    def request_metrics(self) -> dict:
        """The target's figures for the request, with the times, rates and energy of both
        models together, and what speculation did (``speculative``)."""
        t, d = self.target, self.draft
        m = request_metrics(t)
        sec = self.wafer.cycles_to_seconds
        pt, pd = phase_cycles(t), phase_cycles(d)
        ready = max(pt.prefill + pt.transition, pd.prefill + pd.transition)  # both on their own PEs
        dec = sum(self.cycles.values())
        total = ready + dec
        n = max(self.emitted, 1)
        tc, _ = request_counters(t)
        dc, _ = request_counters(d)
        counters = {k: tc[k] + dc[k] for k in COUNTERS}
        tpot = sec(dec / (n - 1)) if n > 1 else None
        examined = self.accepted + self.rejected
        m.update({
            "prefill_tokens_per_s": self.prompt_len / sec(pt.prefill) if pt.prefill else None,
            "tpot_s": tpot,
            "decode_tokens_per_s": 1.0 / tpot if tpot else None,
            "e2e_tokens_per_s": n / sec(total) if total else None,
            **energy(t, sec(total), counters),
            "flops": counters["flops"],
            "bytes_moved": counters["bytes_moved"],
            "routing_stages": counters["routing_stages"],
            "speculative": {
                "draft": d.config.name,
                "draft_layers": d.config.num_layers,
                "draft_grid": d.plan.decode.grid,
                "draft_regions": [st.region.describe() for st in d.plan.decode.stages],
                "num_speculative_tokens": self.k,
                "draft_ahead": self.ahead,
                "acceptance_method": self.acceptance_method,
                "sampled_drafts": self.sampling_drafts,
                "ahead_hits": self.ahead_hits,
                "draft_hidden_s": sec(self.hidden_cycles),
                "rounds": self.rounds,
                "drafted": self.drafted,
                "accepted": self.accepted,
                "rejected": self.rejected,
                # of the drafts the target's tokens were compared with (a request's last round
                # may end before its drafts are reached)
                "acceptance_rate": self.accepted / examined if examined else None,
                "tokens_per_round": (n - 1) / self.rounds if self.rounds else None,
                "draft_ready_s": sec(pd.prefill + pd.transition),
                "decode_s": {k: sec(v) for k, v in self.cycles.items()},
                "draft_sram_peak_bytes_per_pe": max(s.mesh.sram.peak_bytes for s in d.decode_stages + d.prefill_stages),
            },
        })
        return m


def predict_speculative(config, wafer, run: RunConfig, spec: SpeculativeConfig, input_len: int, output_len: int,
                        draft_config=None, seed: int = 0) -> dict:
    """Shape-only: one request with the draft beside the target, each draft accepted with
    ``spec.acceptance``; the metrics of :meth:`SpeculativeBackend.request_metrics`."""
    if spec.acceptance is None:
        raise RequestError("a shape-only prediction has no tokens to compare: give the acceptance rate to assume "
                           "(acceptance, 0..1; --acceptance)")
    target = WaferModel(config, None, wafer, run.replace(speculative_tokens=spec.num_speculative_tokens), mode="dry")
    backend = speculative_backend(target, spec, draft_config)
    backend.run_dry(input_len, output_len, spec.acceptance, seed)
    m = backend.request_metrics()
    m["speculative"]["assumed_acceptance"] = spec.acceptance
    return m


def speculative_backend(target: WaferModel, spec: SpeculativeConfig, draft_config=None, draft_weights=None,
                        progress=None) -> SpeculativeBackend:
    """The target with its draft placed beside it: ``spec.draft_layers`` of the target's own
    (weights from the target's), or ``draft_config``/``draft_weights`` of another model."""
    k = spec.num_speculative_tokens
    if target.run.speculative_tokens < k:
        raise RequestError(f"the target was planned for verification passes of {target.run.speculative_tokens} drafts "
                           f"(RunConfig.speculative_tokens), fewer than the {k} asked: plan it with "
                           f"speculative_tokens={k}, so its decode regions hold the pass's {k + 1} rows")
    if target.layers != target.config.num_layers:
        raise RequestError("speculative decoding runs the whole target (its rollbacks are not extrapolated): "
                           "place every layer")
    if spec.draft_layers is not None:
        draft_config, draft_weights = first_layers(target.config, target.weights, spec.draft_layers)
    if draft_config is None:
        raise RequestError("speculative decoding with draft_model needs the draft's config")
    draft = place_draft(draft_config, draft_weights, target, spec.draft_grid, target.mode, progress)
    return SpeculativeBackend(target, draft, spec.num_speculative_tokens, spec.draft_ahead, spec.acceptance_method)
