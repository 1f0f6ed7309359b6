"""Vocabulary tensors aligned to an output tokenizer, with mergekit 0.1.5's meaning
(its `tokenizer_source: MODEL` or `union`, mergekit.tokenizer.embed.PermutedVocabulary).

Every input's embedding rows (and output head rows) are put in the output vocabulary's
order before the merge: a token a model has keeps that model's row; where a model lacks a
token, its row is the one other model that has it, else the base's row when the base has
it, else the mean of the models that have it, else zeros; a token named in
`tokenizer.tokens` takes the row its entry names (with `force`, in every model); rows past
the tokens (`pad_to_multiple_of`) are each model's mean row. `align` decides this from the
vocabularies alone (pure); `permute` applies it to the tensors (pure, float32).
`union_tokenizer` builds mergekit's union tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputModelError

# the tensors mergekit 0.1.5's architecture tables give a vocabulary axis (axis 0 in all of them)
VOCABULARY_TENSORS = frozenset(
    {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "lm_head.bias",
        "transformer.wte.weight",
        "model.language_model.embed_tokens.weight",
        "model.tok_embeddings.weight",
        "gpt_neox.embed_in.weight",
        "embed_out.weight",
        "output.weight",
        "transformer.word_embeddings.weight",
        "transformer.embedding.word_embeddings.weight",
        "transformer.output_layer.weight",
        "transformer.embd.wte.weight",
    }
)

MISSING = -1
UNION = "union"  # the tokenizer source that is every model's tokens (mergekit's build_union_tokenizer)


@dataclass(frozen=True)
class VocabularyMap:
    """How each input's vocabulary tensors become the output vocabulary's rows.

    `rows[key][i]`: the row of output token i in model `key` (MISSING: it lacks the token).
    `fill`: (i, donors, force) for each token some model lacks or that is forced: the rows
    (key, row) whose mean a model that lacks the token takes (every model with `force`); one
    donor: that row as it is; none: zeros. Rows past the tokens (padding) are each input's
    mean row."""

    size: int  # the output's rows: the tokens, padded (pad_to_multiple_of)
    rows: tuple[tuple[str, tuple[int, ...]], ...]
    fill: tuple[tuple[int, tuple[tuple[str, int], ...], bool], ...]


def align(
    out_vocab: dict[str, int],
    vocabs: dict[str, dict[str, int]],
    vocab_sizes: dict[str, int],
    base: str | None,
    pad_to_multiple_of: int | None = None,
    tokens: dict[str, Any] | None = None,
) -> VocabularyMap:
    """The VocabularyMap onto `out_vocab` (token -> id) of the inputs `vocabs` (key -> its
    tokenizer's token -> id, keys in the inputs' order), each with `vocab_sizes[key]` rows;
    `base`: the key of the base model (its rows win where a model lacks a token); `tokens`:
    token -> its TokenRow (recipe.spec; `model` a key of `vocabs`), mergekit's
    `tokenizer.tokens`. Raises InputModelError where mergekit 0.1.5 stops: an output token at
    a row a model does not have, output ids that are not 0..n-1, a token's source that lacks it."""
    size = len(out_vocab)
    if sorted(out_vocab.values()) != list(range(size)):
        raise InputModelError("tokenizer: the output tokenizer's ids are not 0..n-1 (a tokenizer with gaps)")
    by_id = sorted(out_vocab, key=out_vocab.__getitem__)
    rows: dict[str, tuple[int, ...]] = {}
    for key, vocab in vocabs.items():
        found = tuple(vocab.get(token, MISSING) for token in by_id)
        beyond = [token for token, row in zip(by_id, found, strict=True) if row >= vocab_sizes[key]]
        if beyond:
            raise InputModelError(
                f"{key}: token {beyond[0]!r} of the output tokenizer has id {vocab[beyond[0]]} in this model's "
                f"tokenizer, past its {vocab_sizes[key]} embedding rows (mergekit stops there too)"
            )
        rows[key] = found
    tokens = tokens or {}
    fill = []
    for i, token in enumerate(by_id):
        has = [key for key in vocabs if rows[key][i] != MISSING]
        rule = tokens.get(token)
        force = rule is not None and rule.force
        if len(has) == len(vocabs) and not force:
            continue
        if rule is not None:
            donors = _token_source(token, rule, i, rows, vocabs, vocab_sizes)
        elif len(has) > 1 and base is not None and base in has:
            donors = ((base, rows[base][i]),)
        else:
            donors = tuple((key, rows[key][i]) for key in has)
        fill.append((i, donors, force))
    padded = -(-size // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else size
    return VocabularyMap(padded, tuple(rows.items()), tuple(fill))


def _token_source(
    token: str,
    rule: Any,
    i: int,
    rows: dict[str, tuple[int, ...]],
    vocabs: dict[str, dict[str, int]],
    vocab_sizes: dict[str, int],
) -> tuple[tuple[str, int], ...]:
    """The donor row of a token named in `tokenizer.tokens` (mergekit's compute_default_embedding)."""
    where = f"tokenizer.tokens: {token!r}"
    if rule.zero:
        return ()
    if rule.model is None:
        raise InputModelError(f"{where} needs a source (a model lacks it, or force is set)")
    key = rule.model
    if rule.token_id is not None or rule.token is not None:
        row = rule.token_id
        if row is None:
            row = vocabs[key].get(rule.token, MISSING)
            if row == MISSING:
                raise InputModelError(f"{where}: its source {key} has no token {rule.token!r}")
        if row >= vocab_sizes[key]:
            raise InputModelError(f"{where}: row {row} is past {key}'s {vocab_sizes[key]} embedding rows")
        return ((key, row),)
    if rows[key][i] == MISSING:
        raise InputModelError(f"{where}: its source {key} does not have this token")
    return ((key, rows[key][i]),)


def permute(arrays: dict[str, np.ndarray], vmap: VocabularyMap) -> dict[str, np.ndarray]:
    """Each input's float32 tensor (rows first) in the output vocabulary's order, as
    mergekit computes it: a mean is zeros plus each row in the inputs' order, divided by
    their count (the same float32 bits); padding rows are torch's mean of the token rows."""
    rows = dict(vmap.rows)
    tokens = len(vmap.rows[0][1])
    tail = next(iter(arrays.values())).shape[1:]
    filled = {}
    for i, donors, force in vmap.fill:
        if len(donors) == 1:  # mergekit takes the row as it is (a -0.0 stays -0.0)
            key, row = donors[0]
            filled[i] = (arrays[key][row], force)
            continue
        mean = np.zeros(tail, np.float32)
        for key, row in donors:
            mean = mean + arrays[key][row]
        filled[i] = (mean / np.float32(len(donors)) if donors else mean, force)
    out = {}
    for key, array in arrays.items():
        index = np.asarray(rows[key], dtype=np.int64)
        present = index != MISSING
        result = np.zeros((vmap.size, *tail), np.float32)
        result[:tokens][present] = array[index[present]]
        for i, (row, force) in filled.items():
            if force or not present[i]:
                result[i] = row
        if vmap.size > tokens:  # mergekit's padding: the mean row, as torch computes it
            import torch

            result[tokens:] = torch.from_numpy(result[:tokens]).mean(dim=0).numpy()
        out[key] = result
    return out


def tokenizer_vocab(folder: Path, key: str) -> dict[str, int]:
    """A model's vocabulary as transformers' tokenizer gives it (added tokens included), as
    mergekit reads it."""
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(folder), use_fast=True).get_vocab())
    except (OSError, ValueError) as e:
        raise InputModelError(f"{key}: its tokenizer could not be read ({e})") from None


def output_tokenizer(
    source: str, folders: dict[str, Path], vocab_sizes: dict[str, int], base: str, tokens: Any = ()
) -> Any:
    """The output's tokenizer as mergekit 0.1.5 builds it (build_tokenizer): the tokenizer of
    the model `source` (a key of `folders`; the base's when it is `base`) or the union, then
    each of `tokens` it lacks added, in order, as a plain token."""
    from transformers import AutoTokenizer

    if source == UNION:
        out = union_tokenizer(folders, vocab_sizes, base)
    else:
        try:
            out = AutoTokenizer.from_pretrained(str(folders[source]), use_fast=True)
        except (OSError, ValueError) as e:
            raise InputModelError(f"{source}: its tokenizer could not be read ({e})") from None
        if source == base:  # mergekit strips the base's tokens past its rows; not done here
            _no_tokens_past_rows(out.get_vocab(), vocab_sizes[base], "the base's tokenizer")
    have = set(out.get_vocab())
    for token in tokens:
        if token not in have:
            out.add_tokens(token)
            have.add(token)
    return out


def _no_tokens_past_rows(vocab: dict[str, int], rows: int, what: str) -> None:
    past = [token for token, i in vocab.items() if i >= rows]
    if past:
        raise InputModelError(
            f"base: its tokenizer has {len(past)} tokens past its {rows} embedding rows "
            f"(such as {past[0]!r}); {what} over it is not supported"
        )


def union_tokenizer(folders: dict[str, Path], vocab_sizes: dict[str, int], base: str) -> Any:
    """mergekit 0.1.5's union tokenizer (build_union_tokenizer): the base's tokenizer plus
    every other token of the models (ids past a model's `vocab_size` rows left out), then
    the added tokens, each once (its first model's settings). mergekit numbers the new
    tokens in hash order, which changes from run to run; here they come model by model
    (the base, then the models in order), each model's by id."""
    from transformers import AutoTokenizer

    tokenizers = {}
    for key, folder in folders.items():
        try:
            tokenizers[key] = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        except (OSError, ValueError) as e:
            raise InputModelError(f"{key}: its tokenizer could not be read ({e})") from None
    base_vocab = tokenizers[base].get_vocab()
    _no_tokens_past_rows(base_vocab, vocab_sizes[base], "a union tokenizer")
    tokens: dict[str, None] = {}  # every model's tokens in order, as an ordered set
    added: dict[str, Any] = {}
    for key in [base] + [k for k in folders if k != base]:
        tokenizer = tokenizers[key]
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda e: e[1]):
            if i < vocab_sizes[key]:
                tokens.setdefault(token)
        for i, info in sorted(tokenizer.added_tokens_decoder.items()):
            if i < vocab_sizes[key]:
                added.setdefault(info.content, info)
    out = AutoTokenizer.from_pretrained(str(folders[base]), use_fast=True)
    for token in tokens:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out
