"""MiCo's pretraining losses (from VAST's training code, which MiCo builds on): the omni-modal contrastive loss
against the global batch, hard-negative sampling for the matching loss, and the caption-token masking of the caption
loss. The task grammar (`"tva"` -> vision + audio) lives on the configuration (`MiCoConfig.parse_task`)."""

import torch
import torch.nn.functional as F

from .distributed import all_gather_with_grad


# First id drawn for randomly replaced caption tokens (ids below it are BERT's special and unused tokens).
RANDOM_TOKEN_START = 106


def contrastive_loss(
    text_embeds: torch.Tensor, modality_embeds: torch.Tensor, temperature: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Symmetric cross-entropy of normalised embeddings against the global batch (all processes).

    Args:
        text_embeds (`torch.Tensor` of shape `(batch_size, dim)`): normalised text embeddings of this process.
        modality_embeds (`torch.Tensor` of shape `(batch_size, dim)`): normalised embeddings of the other side.
        temperature (`torch.Tensor`): divides the similarities.
        label_smoothing (`float`): label smoothing of both cross-entropies.

    Returns:
        `(loss, logits_per_text, logits_per_modality, offset)`: the loss, the local rows x global columns similarities
        divided by the temperature, and the offset of the local rows in the global batch (the positives' columns).
    """
    all_text, offset = all_gather_with_grad(text_embeds)
    all_modality, _ = all_gather_with_grad(modality_embeds)
    logits_per_text = text_embeds @ all_modality.t() / temperature
    logits_per_modality = modality_embeds @ all_text.t() / temperature
    targets = torch.arange(offset, offset + text_embeds.shape[0], device=text_embeds.device)
    loss = (
        F.cross_entropy(logits_per_modality, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, targets, label_smoothing=label_smoothing)
    ) / 2
    return loss, logits_per_text, logits_per_modality, offset


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """One column per row drawn with weights `softmax(logits) + 1e-4`, the positive (column `offset + row`) zeroed,
    so it is never drawn (duplicates of the positive elsewhere in the batch can be). Uses torch's global RNG."""
    weights = F.softmax(logits.float(), dim=1) + 1e-4
    rows = torch.arange(logits.shape[0], device=logits.device)
    weights[rows, rows + offset] = 0
    return torch.multinomial(weights, 1).squeeze(1)


@torch.no_grad()
def mask_caption_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    probability: float,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask caption tokens for the caption loss, vectorised, drawing from `generator` (on the device of `input_ids`;
    default: torch's global RNG, as the model's own caption loss does).

    Every non-padding token after position 0 (`[SEP]` included) is chosen with `probability`, conditioned on at least
    one per row, as the original's "redraw until something is chosen" loop: the first chosen token is drawn from the
    truncated geometric distribution of that condition and the tokens after it independently. A chosen token becomes
    `[MASK]` (80%), a random id in `[RANDOM_TOKEN_START, vocab_size)` (10%) or stays (10%).

    Returns:
        `(masked_ids, labels)`: the new ids and the labels (the original id at chosen positions, -100 elsewhere).
    """
    if not 0 < probability <= 1:
        raise ValueError(f"the caption mask probability must be in (0, 1], got {probability}")
    eligible = attention_mask.bool().clone()
    eligible[:, 0] = False
    rank = eligible.long().cumsum(dim=1)  # 1-based rank of each eligible token in its row
    count = rank[:, -1:]
    if probability < 1:
        # inverse CDF of P(first = k | at least one) = p (1-p)^(k-1) / (1 - (1-p)^count), k = 1..count
        keep = torch.tensor(1 - probability, dtype=torch.float64, device=input_ids.device)
        uniform = torch.rand(count.shape, dtype=torch.float64, device=input_ids.device, generator=generator)
        first = torch.ceil(torch.log1p(-uniform * (1 - keep**count)) / torch.log(keep)).long().clamp(min=1)
        first = torch.minimum(first, count)
        later = torch.rand(input_ids.shape, device=input_ids.device, generator=generator) < probability
        chosen = eligible & ((rank == first) | ((rank > first) & later))
    else:
        chosen = eligible
    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    low = RANDOM_TOKEN_START if vocab_size > RANDOM_TOKEN_START else 0
    random_ids = torch.randint(
        low, vocab_size, input_ids.shape, device=input_ids.device, dtype=input_ids.dtype, generator=generator
    )
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


__all__ = ["RANDOM_TOKEN_START", "contrastive_loss", "mask_caption_tokens", "sample_hard_negatives"]
