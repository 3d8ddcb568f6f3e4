"""Variable-length (ragged) batching: which tensors carry a sequence axis, and how to pad.

A model opts in through ``parameters`` in its ``config.pbtxt`` (slimserve's own keys; Triton's
``allow_ragged_batch`` concatenates without padding, which an encoder cannot run)::

    parameters { key: "variable_length_inputs"
                 value { string_value: "input_ids,attention_mask,token_type_ids" } }
    parameters { key: "variable_length_outputs" value { string_value: "last_hidden_state" } }
    parameters { key: "pad_value" value { string_value: "input_ids=0" } }  # optional
    parameters { key: "variable_length_grouping" value { string_value: "false" } }  # optional

Axis 1 (the first after the batch axis) is the sequence axis of every listed tensor. The
batcher pads the listed inputs of shorter requests to the longest in the batch (``pad_value``:
one number for all inputs or ``name=value`` pairs, default 0; an input named
``attention_mask`` always pads with 0) and trims the listed outputs back to each caller's own
length. Outputs not listed (pooled embeddings) are returned as they are. When more requests
wait than fit in a batch, the batcher picks similar lengths unless ``variable_length_grouping``
is ``false`` (then first come, first served, as for other models).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.errors import InvalidInput, RepositoryError

INPUTS_KEY = "variable_length_inputs"
OUTPUTS_KEY = "variable_length_outputs"
PAD_KEY = "pad_value"
GROUPING_KEY = "variable_length_grouping"
MASK_NAME = "attention_mask"
SEQ_AXIS = 1


@dataclass(frozen=True)
class RaggedSpec:
    """The variable-length tensors of one model and the value each input pads with."""

    pad_values: dict[str, float]  # variable-length input -> pad value
    outputs: frozenset[str]  # outputs whose axis 1 is the sequence axis
    group_lengths: bool = True  # batch similar lengths together when more wait than fit

    @classmethod
    def from_config(
        cls,
        config: mc.ModelConfig,
        input_names: Iterable[str],
        output_names: Iterable[str],
    ) -> RaggedSpec | None:
        """The spec the config asks for (None when it marks no input); ``RepositoryError``
        naming the key when it is inconsistent with the model's tensors."""
        params = config.parameters
        if INPUTS_KEY not in params:
            for key in (OUTPUTS_KEY, PAD_KEY, GROUPING_KEY):
                if key in params:
                    raise RepositoryError(f"parameter '{key}' needs '{INPUTS_KEY}' as well")
            return None
        inputs = _names(params[INPUTS_KEY].string_value)
        outputs = _names(params[OUTPUTS_KEY].string_value) if OUTPUTS_KEY in params else []
        if not inputs:
            raise RepositoryError(f"parameter '{INPUTS_KEY}' names no input")
        if config.max_batch_size <= 0:
            raise RepositoryError(f"parameter '{INPUTS_KEY}' needs batching (max_batch_size > 0)")
        _check_known(INPUTS_KEY, inputs, list(input_names), "input")
        _check_known(OUTPUTS_KEY, outputs, list(output_names), "output")
        pads = dict.fromkeys(inputs, 0.0)
        if PAD_KEY in params:
            pads.update(_pad_values(params[PAD_KEY].string_value, inputs))
        if pads.get(MASK_NAME, 0.0) != 0.0:
            raise RepositoryError(f"parameter '{PAD_KEY}': '{MASK_NAME}' must pad with 0")
        grouping = (
            params[GROUPING_KEY].string_value.strip().lower() if GROUPING_KEY in params else ""
        )
        if grouping not in ("", "true", "false"):
            raise RepositoryError(f"parameter '{GROUPING_KEY}' is {grouping!r}; use true or false")
        return cls(pads, frozenset(outputs), grouping != "false")

    def length(self, inputs: dict[str, np.ndarray]) -> int:
        """The request's sequence length; ``InvalidInput`` when its inputs disagree on it."""
        length = None
        first = ""
        for name in self.pad_values:
            array = inputs.get(name)
            if array is None:
                continue
            if array.ndim < 2:
                raise InvalidInput(
                    f"input '{name}' has shape {list(array.shape)}; a variable-length input "
                    "needs [batch, sequence, ...]"
                )
            if length is None:
                length, first = int(array.shape[SEQ_AXIS]), name
            elif array.shape[SEQ_AXIS] != length:
                raise InvalidInput(
                    f"inputs disagree on the sequence length ({length} for '{first}' vs "
                    f"{array.shape[SEQ_AXIS]} for '{name}')"
                )
        if length is None:
            raise InvalidInput(
                f"the request has none of the variable-length inputs {', '.join(self.pad_values)}"
            )
        return length

    def shape_key(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The non-batch shape batching compares: the sequence axis left out when ragged."""
        if name in self.pad_values:
            return (-1, *shape[SEQ_AXIS + 1 :])
        return shape[1:]

    def merge(self, name: str, arrays: list[np.ndarray], width: int) -> np.ndarray:
        """Concatenate along the batch axis, padding a ragged input's sequences to ``width``."""
        if name not in self.pad_values:
            return np.concatenate(arrays)
        first = arrays[0]
        rows = sum(a.shape[0] for a in arrays)
        out = np.full((rows, width, *first.shape[2:]), self.pad_values[name], dtype=first.dtype)
        start = 0
        for array in arrays:
            out[start : start + array.shape[0], : array.shape[SEQ_AXIS]] = array
            start += array.shape[0]
        return out

    def trim(self, name: str, array: np.ndarray, length: int) -> np.ndarray:
        """One caller's rows of output ``name`` cut back to its own sequence length."""
        if name not in self.outputs:
            return array
        return array[:, :length]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_known(key: str, names: list[str], known: list[str], kind: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RepositoryError(
            f"parameter '{key}' names {', '.join(unknown)}, not a model {kind} "
            f"(the model's {kind}s are {', '.join(known) or 'none'})"
        )


def _pad_values(text: str, inputs: list[str]) -> dict[str, float]:
    """``"0"`` (every input) or ``"input_ids=0,token_type_ids=0"``."""
    text = text.strip()
    try:
        if "=" not in text:
            return dict.fromkeys(inputs, float(text))
        values = {}
        for part in _names(text):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in inputs:
                raise RepositoryError(
                    f"parameter '{PAD_KEY}' names '{name}', which is not in '{INPUTS_KEY}'"
                )
            values[name] = float(value)
        return values
    except ValueError:
        raise RepositoryError(
            f"parameter '{PAD_KEY}' is {text!r}; expected a number or name=number pairs"
        ) from None
