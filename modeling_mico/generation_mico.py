"""Caption decoding of the MiCo release: its default generation settings and the beam scoring of Transformers 4.31,
which the release ran on, grafted onto the beam search of current Transformers.

Decoding keeps the self-attention keys/values in a [`PreallocatedCache`] sized for the whole caption (no growth by
concatenation per step).

The mixin overrides private methods of [`~generation.GenerationMixin`] (`_prepare_generation_config`,
`_prepare_cache_for_generation`, `_beam_search`, `_update_finished_beams`, `_check_early_stop_heuristic`) and uses
`_gather_beams`; `tests/test_generation.py` pins
their names and signatures for the supported Transformers range (`transformers>=5.0,<6`), so that an upgrade that
changes them fails loudly instead of silently scoring beams differently.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
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


class PreallocatedLayer(DynamicLayer):
    """Keys/values of one layer in buffers allocated once for `capacity` positions: `update` writes the new positions
    in place (a [`DynamicLayer`] concatenates, copying everything cached at every step), `crop` only shortens the valid
    length, and a beam reorder gathers the valid rows into a second buffer that is then swapped in. `keys` / `values`
    are views of the valid positions, `(batch, heads, length, head_dim)`. Outgrowing `capacity` doubles it."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states, value_states, self.capacity)
        self.is_initialized = True

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        """Fresh buffers (and spares for reordering) of `capacity` positions shaped like the given states."""
        batch, heads, _, _ = key_states.shape
        self.capacity = capacity
        self._buffers = [
            tensor.new_empty(batch, heads, capacity, tensor.shape[-1])
            for tensor in (key_states, value_states, key_states, value_states)
        ]
        self._set_views()

    def _set_views(self) -> None:
        self.keys = self._buffers[0][:, :, : self.length]
        self.values = self._buffers[1][:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length
        keys, values = self.extend(key_states.shape[-2])
        keys[:, :, start:].copy_(key_states)
        values[:, :, start:].copy_(value_states)
        return keys, values

    def extend(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the valid length of an initialized layer over `count` more positions (growing the buffers when
        needed) and return the views of all valid positions; the caller writes the keys/values of the last `count`
        (what `update` does, and the fused decoding step of `MiCoTextModel` in place)."""
        end = self.length + count
        if end > self.capacity:
            keys, values = self.keys, self.values
            self._allocate(keys, values, max(end, 2 * self.capacity))
            self._buffers[0][:, :, : self.length].copy_(keys)
            self._buffers[1][:, :, : self.length].copy_(values)
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (a negative count, as [`DynamicLayer.crop`] takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)
        if self.is_initialized:
            self._set_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Gather the rows `beam_idx` (valid positions only) into the spare buffers and swap them in."""
        if self.length == 0:
            return
        beam_idx = beam_idx.to(self.device)
        keys, values, spare_keys, spare_values = self._buffers
        torch.index_select(self.keys, 0, beam_idx, out=spare_keys[:, :, : self.length])
        torch.index_select(self.values, 0, beam_idx, out=spare_values[:, :, : self.length])
        self._buffers = [spare_keys, spare_values, keys, values]
        self._set_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace_rows(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace_rows(lambda tensor: tensor[indices])

    def _replace_rows(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Rebuild the buffers from `transform` of the valid keys/values (contrastive search changes the batch)."""
        if self.length == 0:
            return
        keys, values = transform(self.keys), transform(self.values)
        self._allocate(keys, values, self.capacity)
        self._buffers[0][:, :, : self.length].copy_(keys)
        self._buffers[1][:, :, : self.length].copy_(values)


class PreallocatedCache(DynamicCache):
    """A [`DynamicCache`] whose layers are [`PreallocatedLayer`]s of `capacity` positions (allocated at their first
    update, with the batch, heads and dtype of what they receive)."""

    def __init__(self, num_layers: int, capacity: int):
        Cache.__init__(self, layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


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

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict,
        generation_mode,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Without a user cache or `cache_implementation`, decode into an [`EncoderDecoderCache`] of a
        [`PreallocatedCache`] for the self-attention (room for `max_cache_length` tokens and the probe token the
        model appends) and a [`DynamicCache`] for the context's keys/values, written once."""
        if (
            model_kwargs.get("cache") is not None
            or generation_config.use_cache is False
            or generation_config.cache_implementation is not None
        ):
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        num_layers = self.config.get_text_config(decoder=True).num_hidden_layers
        model_kwargs["cache"] = EncoderDecoderCache(
            PreallocatedCache(num_layers, max_cache_length + 2), DynamicCache()
        )

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


__all__ = ["MiCoGenerationMixin", "PreallocatedCache", "PreallocatedLayer", "default_generation_config"]
