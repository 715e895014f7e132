"""The model runner: every forward the engine makes, over the paged latent cache.

Four kinds, each a method; they read and write a request's cache state (``num_cached``, the hidden-state
tail, pending drafts — see ``request.py``) and return the tokens they sampled, never deciding what happens
next (the scheduler and the output processor do):

* :meth:`ModelRunner.prefill` — one prompt in forwards of at most ``prefill_chunk`` tokens (chunked prefill:
  ``attention="auto"`` takes the materialised path, SDPA with ``is_causal`` for the first chunk and a
  ``[chunk, length]`` boolean mask after it, never a per-head score matrix of the whole prompt), each chunk's
  latent KV into its blocks as it runs, its first token sampled. Prompts prefilled in
  the same round share work: the cache rows of the longest prefix a prompt has in common with an earlier
  one are copied (causal attention makes them identical) and only the rest runs.
* :meth:`ModelRunner.decode` — one token for each request of a batch, in one forward of one position per
  sequence (the absorbed path reads only the latent cache). **This is the seam for a faster decode step**
  (a compiled, static-shape or graph-captured one): a subclass overrides ``decode`` with the same contract
  — for each request feed ``tokens[-1]`` at position ``num_cached``, advance ``num_cached`` by one, return
  the next token sampled with the request's own params and generator — and this eager implementation stays
  as the reference it is tested against.
* :meth:`ModelRunner.verify` — the main model over ``[t_n, d_1..d_k]`` for each speculative request; the
  accepted prefix stays in the cache, rejected positions are dropped.
* :meth:`ModelRunner.draft` — the MTP modules propose the next drafts (speculative.py has the windows); each
  module's window runs through :meth:`ModelRunner._mtp`, the seam a compiled draft step overrides.
* :meth:`ModelRunner.place` — a request prefilled by another engine (handoff.py): its latent rows go into
  its blocks and its first token is the one the prefill sampled; nothing runs.

Log-probabilities (logprobs.py), when a request asks for them, are taken from the same logits its tokens are
sampled from and left in ``request.pending_logprobs`` for the output processor; prompt log-probabilities
come from ``lm_head`` over the prefill's hidden states.

Sampling happens here, per request, with the request's own generator, so a request's tokens do not depend
on which others share its batch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from latentmoe.infer.logprobs import token_logprobs
from latentmoe.infer.paged_cache import PagedLatentCache
from latentmoe.infer.request import Request
from latentmoe.infer.sampling import Acceptance, greedy_accept, rejection_sample, sample_next, token_probs
from latentmoe.infer.speculative import DraftPlan, draft_window_starts
from latentmoe.model.mla import ATTENTION_MODES
from latentmoe.model.transformer import CausalLM

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds its attention scores at chunk x length
PAD_TOKEN_ID = 0  # fills draft-window positions past a sequence's end; their outputs are never used


@dataclass
class PrefillOutput:
    """What a prefill leaves for prompts prefilled after it in the same round: its prompt, the logits of
    the last position and the main model's hidden states ``[S, D]`` at every prompt position."""

    request_id: int
    prompt_ids: list[int]
    last_logits_1V: torch.Tensor
    hidden_SD: torch.Tensor


PrefillRound = dict[tuple[int, ...], PrefillOutput]  # prompt -> its prefill, for one admission round


@dataclass
class PrefillResult:
    """A prefilled request's first token, and how many prompt positions ran through the model
    (``computed_tokens``) or were copied from a shared prefix (``shared_tokens``)."""

    token: int
    computed_tokens: int
    shared_tokens: int


@dataclass
class Verification:
    """One request's verification: ``num_drafted`` drafts checked, the first ``num_accepted`` stood, and
    the ``tokens`` emitted (those drafts, then the target's own next token)."""

    num_drafted: int
    num_accepted: int
    tokens: list[int]


def longest_shared_prefix(
    prompt_ids: list[int], candidates, live: Collection[object]
) -> tuple[PrefillOutput | None, int]:
    """The candidate (still holding its blocks: its id in ``live``) sharing the longest prefix with
    ``prompt_ids``, and that prefix's length (0 and None when nothing is shared)."""
    best, best_len = None, 0
    for cand in candidates:
        if cand.request_id not in live:
            continue
        length = 0
        for a, b in zip(prompt_ids, cand.prompt_ids, strict=False):
            if a != b:
                break
            length += 1
        if length > best_len:
            best, best_len = cand, length
    return best, best_len


class ModelRunner:
    """Prefill, decode, verify and draft forwards of ``model`` over ``cache`` (see the module docstring).

    Args:
        model: the ``CausalLM``, in eval mode, on ``device``.
        cache: the paged cache; its first ``num_hidden_layers`` layers are the main model's, the rest the
            MTP modules'.
        device: where inputs are built. attention: "auto", "absorbed" or "materialised".
    """

    def __init__(
        self,
        model: CausalLM,
        cache: PagedLatentCache,
        *,
        device: torch.device,
        attention: str = "auto",
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model = model
        self.cache = cache
        self.config = model.config
        self.device = device
        self.dtype = model.lm_head.weight.dtype
        self.attention = attention

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _forward(self, batch: list[Request], ids_BS: list[list[int]], start_B: list[int]):
        start_pos_B = self._tensor(start_B)
        input_ids = self._tensor(ids_BS)
        view = self.cache.view([r.request_id for r in batch], start_pos_B, input_ids.shape[1])
        return self.model(input_ids, cache=view, start_pos=start_pos_B, compute_mtp=False, attention=self.attention)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, request: Request, shared: PrefillRound) -> PrefillResult:
        """The prompt's latent KV into ``request``'s (new) blocks and its first token; ``shared`` holds the
        prefills of this round so far and gains this one. An identical earlier prompt (parallel samples)
        gives its last logits too, and nothing runs."""
        n = len(request.prompt_ids)
        self.cache.add_sequence(request.request_id)
        source, common = longest_shared_prefix(request.prompt_ids, shared.values(), self.cache.block_tables)
        if common == n and len(source.prompt_ids) != n:
            common -= 1  # a strict prefix of a longer prompt: its last position's logits still need a forward
        if common:
            self.cache.copy_prefix(source.request_id, request.request_id, common,
                                   num_layers=self.config.num_hidden_layers)
        if common == n:
            prefill = PrefillOutput(request.request_id, request.prompt_ids, source.last_logits_1V, source.hidden_SD)
        else:
            self.cache.ensure(request.request_id, n)
            hidden = [source.hidden_SD[:common]] if common else []
            for lo in range(common, n, self.prefill_chunk):  # each chunk's latent rows enter the cache as it runs
                hi = min(n, lo + self.prefill_chunk)
                out = self._forward([request], [request.prompt_ids[lo:hi]], [lo])
                hidden.append(out.hidden[0])
            hidden_SD = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
            prefill = PrefillOutput(request.request_id, request.prompt_ids, out.logits[0, -1:], hidden_SD)
        shared[tuple(request.prompt_ids)] = prefill
        request.num_cached = n
        request.hidden_tail_PD = prefill.hidden_SD
        if (top_n := request.params.prompt_logprobs) is not None:
            logits_SV = self.model.lm_head(prefill.hidden_SD[:-1])  # position i predicts prompt token i + 1
            request.prompt_logprobs = [None, *token_logprobs(logits_SV, request.prompt_ids[1:], top_n)]
        token = self._sample(request, prefill.last_logits_1V)
        return PrefillResult(token=token, computed_tokens=n - common, shared_tokens=common)

    @torch.no_grad()
    def place(self, request: Request) -> PrefillResult:
        """Admit a request prefilled elsewhere (``request.handoff``): its latent rows into its own blocks, its
        hidden states and log-probabilities onto the request; the first token is the prefill's."""
        handoff, n = request.handoff, len(request.prompt_ids)
        self.cache.add_sequence(request.request_id)
        self.cache.import_rows(request.request_id, handoff.kv_LnX, handoff.scale_Ln)
        request.num_cached = n
        if handoff.hidden_nD is not None:
            request.hidden_tail_PD = handoff.hidden_nD.to(device=self.device, dtype=self.dtype)
        if handoff.first_logprob is not None:
            request.pending_logprobs.append(handoff.first_logprob)
        request.prompt_logprobs = handoff.prompt_logprobs
        request.handoff = None  # the rows live in the cache now
        return PrefillResult(token=handoff.first_token, computed_tokens=0, shared_tokens=0)

    @staticmethod
    def _sample(request: Request, logits_1V: torch.Tensor) -> int:
        """The next token from the last-position logits with the request's params and generator (its
        log-probability noted when asked for)."""
        token = int(sample_next(logits_1V, request.params, request.generator)[0])
        if (top_n := request.params.logprobs) is not None:
            request.pending_logprobs.extend(token_logprobs(logits_1V, [token], top_n))
        return token

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, batch: list[Request]) -> list[int]:
        """One new token for each request, one batched forward over the paged cache (eager reference of
        the decode seam; see the module docstring for the contract an override keeps)."""
        for r in batch:
            self.cache.ensure(r.request_id, r.num_cached + 1)
        out = self._forward(batch, [[r.tokens[-1]] for r in batch], [r.num_cached for r in batch])
        tokens = []
        for b, r in enumerate(batch):
            r.num_cached += 1
            tokens.append(self._sample(r, out.logits[b, -1:]))
        return tokens

    # ------------------------------------------------------------------ speculative
    @torch.no_grad()
    def verify(self, batch: list[Request], plan: DraftPlan) -> list[Verification]:
        """Verify every request's own drafts and keep the accepted prefixes in the cache.

        Requests with the same number of drafts share one forward (all of them, except near their ends), so
        a request's verification never depends on which others share its batch."""
        logits: dict[int, torch.Tensor] = {}
        hidden: dict[int, torch.Tensor] = {}
        groups: dict[int, list[Request]] = {}
        for r in batch:
            groups.setdefault(len(r.drafts), []).append(r)
        for k, group in groups.items():
            for r in group:
                self.cache.ensure(r.request_id, r.num_cached + k + 1)
            out = self._forward(group, [[r.tokens[-1], *r.drafts] for r in group], [r.num_cached for r in group])
            for b, r in enumerate(group):
                logits[r.request_id], hidden[r.request_id] = out.logits[b], out.hidden[b]
        return [self._accept(r, plan, logits[r.request_id], hidden[r.request_id]) for r in batch]

    def _accept(self, r: Request, plan: DraftPlan, logits_SV: torch.Tensor, hidden_SD: torch.Tensor) -> Verification:
        """Accept a prefix of ``r``'s drafts from the main model's logits over ``[t_n, d_1..d_k]`` (rows past
        ``1 + k`` are padding), keep it in the cache and emit it with the target's own next token."""
        drafts = r.drafts
        k = len(drafts)
        if k == 0:  # a request one token from its end: no drafts this step
            acceptance = Acceptance(0, int(sample_next(logits_SV[:1], r.params, r.generator)[0]))
        elif r.params.greedy:
            acceptance = greedy_accept(logits_SV[: k + 1].argmax(-1).tolist(), drafts)
        else:
            p_K1V = token_probs(logits_SV[: k + 1], r.params)
            accepted, nxt = rejection_sample(p_K1V[None], r.draft_probs_KV[None, :k], self._tensor([drafts]),
                                             r.generator)
            acceptance = Acceptance(int(accepted[0]), int(nxt[0]))
        a = acceptance.num_accepted
        emitted = acceptance.emitted(drafts)
        if (top_n := r.params.logprobs) is not None:  # emitted token j was sampled at verified position j
            r.pending_logprobs.extend(token_logprobs(logits_SV[: a + 1], emitted, top_n))
        r.hidden_tail_PD = torch.cat([r.hidden_tail_PD, hidden_SD[: a + 1]])[-plan.hidden_tail :]
        r.num_cached += a + 1
        self.cache.truncate(r.request_id, r.num_cached)  # rejected positions are dropped
        r.drafts, r.draft_probs_KV = [], None
        return Verification(num_drafted=k, num_accepted=a, tokens=emitted)

    @torch.no_grad()
    def draft(self, batch: list[Request], plan: DraftPlan) -> None:
        """Draft up to ``plan.num_draft_tokens`` tokens per request with the MTP modules (see speculative.py)."""
        lengths = [r.num_cached for r in batch]
        starts, width = draft_window_starts(lengths, [r.mtp_final for r in batch])
        # never draft past max_tokens: the last token of a request is always the target's own (each request
        # keeps its own count, so its drafts do not depend on which others share the batch)
        keep_B = [max(0, min(plan.num_draft_tokens, r.remaining - 1)) for r in batch]
        keep = max(keep_B)
        for r, start in zip(batch, starts, strict=True):
            self.cache.ensure(r.request_id, max(start + width, r.num_cached + keep))
        hidden_BWD = torch.zeros(len(batch), width, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for b, (r, start) in enumerate(zip(batch, starts, strict=True)):
            tail = r.hidden_tail_PD
            first = r.num_cached - tail.shape[0]  # position of tail row 0
            real = min(width, r.num_cached - start)
            if start < first:
                raise RuntimeError(f"draft window starts at {start} but hidden states are kept from {first}")
            hidden_BWD[b, :real] = tail[start - first : start - first + real]
        drafts: list[list[int]] = [[] for _ in batch]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        last = [n - 1 - start for n, start in zip(lengths, starts, strict=True)]  # window index of position n-1
        prev_BWD = hidden_BWD
        for depth in range(1, plan.chain_modules + 1):
            ids = []
            for r, start, d in zip(batch, starts, drafts, strict=True):
                ext = r.tokens + d  # t_0..t_n, then this step's drafts d_1..d_{depth-1}
                ids.append([ext[p + depth] if p + depth < len(ext) else PAD_TOKEN_ID
                            for p in range(start, start + width)])
            prev_BWD, logits_BWV = self._mtp(batch, depth, prev_BWD, ids, starts)
            for b, r in enumerate(batch):
                self._propose(r, logits_BWV[b, last[b] : last[b] + 1], drafts[b], probs[b])
        if plan.recursive:
            g_B1D = torch.stack([prev_BWD[b, last[b]] for b in range(len(batch))])[:, None]
            for j in range(2, keep + 1):
                # a request past its own count drafts on as padding (never kept), inside the position limit
                limit = self.config.max_position_embeddings - 1
                start_B = [min(n + j - 2, limit) for n in lengths]
                g_B1D, logits_B1V = self._mtp(batch, 1, g_B1D, [[d[-1]] for d in drafts], start_B)
                for b, r in enumerate(batch):
                    self._propose(r, logits_B1V[b], drafts[b], probs[b])
        for b, r in enumerate(batch):
            r.drafts = drafts[b][: keep_B[b]]
            r.draft_probs_KV = torch.cat(probs[b])[: keep_B[b]] if probs[b] else None
            r.mtp_final = max(0, r.num_cached - plan.chain_modules + 1)
            r.hidden_tail_PD = r.hidden_tail_PD[-plan.hidden_tail :]

    def _mtp(self, batch: list[Request], depth: int, prev_BWD: torch.Tensor, ids_BW: list[list[int]],
             start_B: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module ``depth`` over a window of W positions per sequence from ``start_B[b]`` (its cache rows
        written): h^depth ``[B, W, D]`` and the logits ``[B, W, V]``. The seam a faster runner overrides."""
        start_pos_B = self._tensor(start_B)
        view = self.cache.view([r.request_id for r in batch], start_pos_B, len(ids_BW[0]))
        return self.model.mtp_forward(depth, prev_BWD, self._tensor(ids_BW), cache=view, start_pos=start_pos_B,
                                      attention=self.attention)

    @staticmethod
    def _propose(request: Request, logits_1V: torch.Tensor, drafts: list[int], probs: list[torch.Tensor]) -> None:
        """Pick one draft token from a module's logits: the argmax when greedy, else a sample from q."""
        if request.params.greedy:
            drafts.append(int(logits_1V.argmax()))
            return
        q_1V = token_probs(logits_1V, request.params)
        drafts.append(int(torch.multinomial(q_1V, 1, generator=request.generator)[0, 0]))
        probs.append(q_1V)
