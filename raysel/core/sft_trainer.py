"""TRL's SFTTrainer with the response loss of the eval pass (raysel.core.finetune.response_token_nll).

A module of its own so that reading the evaluate config does not import TRL."""

from __future__ import annotations

from trl import SFTTrainer

from raysel.core.finetune import response_token_nll


class ResponseLossTrainer(SFTTrainer):
    """The mean NLL of the batch's response tokens (the collator's labels that are not -100), with the
    head run at those positions only. TRL's own loss scores every position; on a CPU its chunked
    kernel falls back to a Python loop over the vocabulary and took 40 % of a fine-tune step."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # one optimizer step per batch (no gradient accumulation), so this is TRL's sum / num_items_in_batch, and
        # as TRL's, a batch with no token to predict gives 0, not the NaN of an empty mean
        nll = response_token_nll(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"] != -100)
        loss = nll.sum() / max(nll.numel(), 1)
        return (loss, None) if return_outputs else loss
