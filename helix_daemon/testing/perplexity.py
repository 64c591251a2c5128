"""Perplexity of a causal LM on a fixed English text: the quantization error, measured."""

from __future__ import annotations

import math
from typing import Any

import torch

# Plain prose the chat model has not been asked about; about 330 tokens with SmolLM2's tokenizer.
FIXED_TEXT = (
    "The lighthouse stood at the end of a long stone pier, and for most of the year nobody went "
    "there except the keeper. Every evening he climbed the spiral stairs, trimmed the wick and "
    "polished the great lens until it shone. Ships passing in the night saw the beam sweep across "
    "the water once every ten seconds, and the sailors knew that the rocks were close. In the "
    "winter the storms came from the west. Waves broke over the pier and the spray reached the "
    "windows of the lamp room, but the light never went out. The keeper kept a log of every "
    "vessel he saw: its name when he could read it, the direction it was heading and the state "
    "of the weather. Years later the log books were found in a cupboard of the town library. "
    "Historians used them to work out how trade along the coast had changed, which ports had "
    "grown and which had been forgotten. The keeper himself was remembered only by the old "
    "fishermen, who said that he had once rowed out alone in a gale to bring back two boys whose "
    "boat had overturned. When electricity reached the village, the light was automated and the "
    "keeper moved into a small cottage behind the harbour. He grew vegetables, repaired nets for "
    "his neighbours and walked along the pier every morning, looking out to sea as if he were "
    "still on duty. Children from the school visited him to hear his stories about shipwrecks, "
    "smugglers and the winter when the harbour froze for the first time in a hundred years."
)


def perplexity(model: Any, tokenizer: Any, text: str = FIXED_TEXT) -> float:
    """exp of the mean next-token loss over ``text`` in one forward pass (float64 reduction)."""
    ids = torch.tensor([tokenizer(text)["input_ids"]], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(loss.item())
