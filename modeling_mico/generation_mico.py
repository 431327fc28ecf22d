"""Caption decoding of the MiCo release: its default generation settings and the beam scoring of Transformers 4.31,
which the release ran on, grafted onto the beam search of current Transformers.

The mixin overrides private methods of [`~generation.GenerationMixin`] (`_prepare_generation_config`, `_beam_search`,
`_update_finished_beams`, `_check_early_stop_heuristic`) and uses `_gather_beams`; `tests/test_generation.py` pins
their names and signatures for the supported Transformers range (`transformers>=5.0,<6`), so that an upgrade that
changes them fails loudly instead of silently scoring beams differently.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation import GenerationConfig, GenerationMixin

from .configuration_mico import MiCoConfig


def default_generation_config(config: MiCoConfig) -> GenerationConfig:
    """Caption decoding of the release: beam search with 3 beams, length penalty 0.6 over the hypothesis length
    including the `[CLS]` prompt (Transformers 4.31, `early_stopping=False`), `max_caption_length` new tokens,
    starting at `[CLS]`, stopping at `[SEP]`, finished rows padded with `[PAD]`."""
    text_config = config.text_config
    generation_config = GenerationConfig(
        num_beams=3,
        length_penalty=0.6,
        early_stopping=False,
        max_new_tokens=config.max_caption_length,
        bos_token_id=text_config.bos_token_id,
        decoder_start_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    generation_config.length_penalty_includes_prompt = True
    return generation_config


@dataclass
class _ReleaseBeamScoring:
    """Per-call state of a beam search scored like Transformers 4.31."""

    eos_token_ids: torch.Tensor | None
    best_candidate_scores: torch.Tensor | None = None

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eos_token_ids is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos_token_ids.to(tokens.device))


def _or_current_scoring(method: Callable) -> Callable:
    """Run the release's scoring `method` inside a release-scored beam search, `GenerationMixin`'s own otherwise."""

    @functools.wraps(method)
    def dispatch(self, *args, **kwargs):
        if self._release_beam_scoring is None:
            return getattr(super(MiCoGenerationMixin, self), method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return dispatch


class MiCoGenerationMixin(GenerationMixin):
    r"""
    [`~generation.GenerationMixin`] whose beam search scores finished hypotheses as the MiCo release did
    (Transformers 4.31): `sum_logprobs / len ** length_penalty` with `len` counting the prompt, `early_stopping=False`
    judged against the step's best candidate over the current length. `length_penalty_includes_prompt=False` (a
    `generate` argument or a generation-config attribute) selects the rule of current Transformers (generated tokens
    only). Rows finished early are padded with `pad_token_id`.
    """

    _release_beam_scoring: _ReleaseBeamScoring | None = None

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs) -> tuple:
        """Accept `length_penalty_includes_prompt` as a `generate` argument even when the loaded generation config
        does not carry it."""
        includes_prompt = kwargs.pop("length_penalty_includes_prompt", None)
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        if includes_prompt is not None:
            generation_config.length_penalty_includes_prompt = includes_prompt
        return generation_config, model_kwargs

    def _beam_search(self, input_ids: torch.LongTensor, *args, generation_config: GenerationConfig, **kwargs):
        """Transformers' beam search with the release's scoring (unless `length_penalty_includes_prompt=False`);
        rows finished early are padded with `pad_token_id`."""
        if getattr(generation_config, "length_penalty_includes_prompt", True):
            self._release_beam_scoring = _ReleaseBeamScoring(generation_config._eos_token_tensor)
        try:
            output = super()._beam_search(input_ids, *args, generation_config=generation_config, **kwargs)
        finally:
            self._release_beam_scoring = None
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        eos, pad = generation_config._eos_token_tensor, generation_config._pad_token_tensor
        if eos is not None and pad is not None:
            generated = sequences[:, input_ids.shape[1] :]
            is_eos = torch.isin(generated, eos.to(generated.device))
            generated.masked_fill_((is_eos.cumsum(dim=-1) - is_eos.long()) > 0, pad.item())
        if not isinstance(output, torch.Tensor) and output.sequences_scores is not None:
            output.sequences_scores = output.sequences_scores.float()
        return output

    @_or_current_scoring
    def _update_finished_beams(
        self,
        sequences: torch.Tensor,
        topk_running_sequences: torch.Tensor,
        beam_scores: torch.Tensor,
        topk_log_probs: torch.Tensor,
        beam_indices: torch.Tensor,
        topk_running_beam_indices: torch.Tensor,
        is_early_stop_heuristic_unsatisfied: torch.Tensor,
        is_sent_finished: torch.Tensor,
        next_token_hits_stopping_criteria: torch.Tensor,
        top_num_beam_mask: torch.Tensor,
        num_beams: int,
        cur_len: int,
        decoder_prompt_len: int,
        length_penalty: float,
        early_stopping: bool | str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transformers 4.31's hypotheses: one ending in `[SEP]` scores `sum_logprobs / len ** length_penalty` with
        `len` counting the prompt and not the `[SEP]`; at the length limit the `num_beams` best running beams are
        finished over their full length. Scores are compared in float64, as 4.31 did in Python."""
        scoring = self._release_beam_scoring
        is_eos = scoring.is_eos(topk_running_sequences[:, :, cur_len])
        if cur_len + 1 >= sequences.shape[-1]:
            running = ~is_eos & (torch.cumsum(~is_eos, dim=-1) <= num_beams)
            finished = (is_eos & top_num_beam_mask) | running
        else:
            finished = next_token_hits_stopping_criteria & top_num_beam_mask
        finished = finished & is_early_stop_heuristic_unsatisfied
        if early_stopping is True:
            finished = finished & ~is_sent_finished.all(dim=-1, keepdim=True)
        denominators = torch.where(is_eos, float(cur_len) ** length_penalty, float(cur_len + 1) ** length_penalty)
        scores = torch.where(finished, topk_log_probs.double() / denominators.double(), -1.0e9)
        scoring.best_candidate_scores = topk_log_probs[:, :1].double()

        merged_scores = torch.cat((beam_scores.double(), scores), dim=1)
        keep = torch.topk(merged_scores, k=num_beams)[1]
        return (
            self._gather_beams(torch.cat((sequences, topk_running_sequences), dim=1), keep),
            self._gather_beams(merged_scores, keep),
            self._gather_beams(torch.cat((beam_indices, topk_running_beam_indices), dim=1), keep),
            self._gather_beams(torch.cat((is_sent_finished, finished), dim=1), keep),
        )

    @_or_current_scoring
    def _check_early_stop_heuristic(
        self,
        is_early_stop_heuristic_unsatisfied: torch.Tensor,
        running_beam_scores: torch.Tensor,
        beam_scores: torch.Tensor,
        is_sent_finished: torch.Tensor,
        cur_len: int,
        max_length: int,
        decoder_prompt_len: int,
        early_stopping: bool | str,
        length_penalty: float,
    ) -> torch.Tensor:
        """Transformers 4.31's `BeamHypotheses.is_done`: with `num_beams` finished hypotheses, stop when the worst of
        them beats the step's best candidate over the current length (prompt included)."""
        scoring = self._release_beam_scoring
        length = max_length if early_stopping == "never" and length_penalty > 0.0 else cur_len
        best_possible = scoring.best_candidate_scores / float(length) ** length_penalty
        worst_finished = beam_scores.min(dim=-1, keepdim=True)[0]
        done = is_sent_finished.all(dim=-1, keepdim=True) & (
            (early_stopping is True) | (worst_finished >= best_possible)
        )
        return is_early_stop_heuristic_unsatisfied & ~done


__all__ = ["MiCoGenerationMixin", "default_generation_config"]
