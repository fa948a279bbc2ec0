"""Where the chosen blocks meet the question. Pasted text ends with a blank line before the question, and in chat
form SmolLM2 then answers a 2k needle from the passage (15 of 18) where the slots glued to the question are read as
the essay going on (10 of 18); but the same blank line turns filler passkeys into definitions ("The pass key is a
special code ...", 0 of 6 against 6 of 6). So both layouts are tried for a few greedy tokens and the one the model
answers more surely is kept (docs/evaluation.md, "The surer of two layouts")."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from extended_mind.attention.session import Session
from extended_mind.base.kv_cache import new_cache
from extended_mind.engine.blocks import BlockPlan
from extended_mind.engine.compiled import CompiledStep
from extended_mind.engine.decoding import biased, row_forward
from extended_mind.engine.fast_step import FastStep
from extended_mind.engine.options import GenerationOptions
from extended_mind.parallel.group import ShardGroup
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings

# greedy tokens each layout answers before they are compared (in the development probe 4 and 8 chose worse on
# profiles and passkeys: answers open alike, "The pass key is", and part only after)
SURE_TOKENS = 16


def settle_layout(model: PreTrainedModel, plan: BlockPlan, prompt_ids: list[int], layers: dict[int, LayerMemory],
                  settings: GenerationOptions, stop_ids: set[int], step: CompiledStep | FastStep | None = None,
                  group: ShardGroup | None = None) -> list[int]:  # fmt: skip
    """The prompt that reads the chosen blocks (`layers`): with `plan.separator` after the slots, or without it,
    whichever `plan.breaks` asks for ("surer": the one whose first greedy tokens have the higher mean
    log-probability; a tie keeps the prompt as it is). Sharded (`group`), rank 0's tokens and choice hold."""
    if not plan.separator or plan.whole is not None or plan.breaks == "never":
        return prompt_ids
    broken = plan.after_slots(prompt_ids)
    if plan.breaks == "always":
        return broken
    plain = _sureness(model, prompt_ids, plan.positions(len(prompt_ids)), layers, settings, stop_ids, step, group)
    other = _sureness(model, broken, plan.positions(len(broken)), layers, settings, stop_ids, step, group)
    pick = int(other > plain)
    if group is not None:
        pick = group.agree([pick], "agreeing on the layout")[0]
    return broken if pick else prompt_ids


def _sureness(model: PreTrainedModel, ids: list[int], positions: list[int], layers: dict[int, LayerMemory],
              s: GenerationOptions, stop_ids: set[int], step: CompiledStep | FastStep | None,
              group: ShardGroup | None) -> float:  # fmt: skip
    """Mean log-probability of the greedy answer's first tokens (at most SURE_TOKENS, or `max_new_tokens`)."""
    device = next(model.parameters()).device
    session = Session(layers=layers, settings=RetrievalSettings(s.topk, s.ranking, s.similarity_threshold))
    cache, logprobs = new_cache(model.config), []
    with session.active(), torch.inference_mode():
        for _ in range(min(SURE_TOKENS, s.max_new_tokens)):
            logits = row_forward(model, step, session, cache, ids, positions, device)
            token = int(biased(logits, s.logit_bias).argmax())
            if group is not None:  # every rank runs the same trial
                token = group.agree([token], "agreeing on a layout trial token")[0]
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            if token in stop_ids:
                break
            ids, positions = [token], [positions[-1] + 1]
    return sum(logprobs) / len(logprobs)
