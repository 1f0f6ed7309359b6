"""What a merge will do, decided from tensor headers and configs alone (no weights read).

`plan_merge` is pure: the engine feeds it local safetensors headers, the Hub code feeds it
remote ones (`get_safetensors_metadata`), so a merge is checked the same way before a
byte of weights is read or downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleModelsError
from ..recipe.spec import Recipe
from .st_header import FLOAT_DTYPES, TensorSpec
from .tensor_params import layer_of, with_layer
from .vocabulary import VOCABULARY_TENSORS, VocabularyMap

RECIPE_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ST_TO_RECIPE = {v: k for k, v in RECIPE_TO_ST.items()}
BASE = "base"  # key of the base model in specs/configs/sources


@dataclass(frozen=True)
class TensorJob:
    name: str
    out_shape: tuple[int, ...]
    out_dtype: str
    merge: bool  # False: copied from the reference model (non-float tensors)
    shared_rows: int | None = None  # vocabulary tensors: rows every model has (merged)
    extra_rows_from: str | None = None  # model key whose rows beyond shared_rows are copied
    # a slice's tensor: its inputs in the method's order as (label, model key, tensor name),
    # the label 'base' for the slice's base; the slice's index and the tensor's position t
    inputs: tuple[tuple[str, str, str], ...] | None = None
    slice: int | None = None
    t: float | None = None
    # every input's rows put in the output vocabulary's order first (MergePlan.vocabulary)
    aligned: bool = False

    @property
    def out_nbytes(self) -> int:
        return TensorSpec(self.out_dtype, self.out_shape).nbytes


@dataclass
class MergePlan:
    jobs: list[TensorJob]
    reference: str  # model key whose config and non-float tensors the output starts from
    tokenizer_source: str  # model key
    out_dtype: str  # safetensors code
    vocab_rows: dict[str, int] = field(default_factory=dict)  # model key -> vocab size
    output_vocab: int | None = None
    bytes_to_read: int = 0
    layers: int | None = None  # the output's layer count when slices decide it (config.json)
    vocabulary: VocabularyMap | None = None  # the inputs' vocabularies aligned to the tokenizer's

    @property
    def parameters(self) -> int:
        return sum(TensorSpec(j.out_dtype, j.out_shape).numel for j in self.jobs)

    @property
    def bytes_to_write(self) -> int:
        return sum(j.out_nbytes for j in self.jobs)

    def summary(self) -> dict[str, Any]:
        return {
            "tensors": len(self.jobs),
            "parameters": self.parameters,
            "bytes_to_read": self.bytes_to_read,
            "bytes_to_write": self.bytes_to_write,
            "output_dtype": ST_TO_RECIPE.get(self.out_dtype, self.out_dtype),
            "tokenizer_source": self.tokenizer_source,
            "vocab_rows": dict(self.vocab_rows),
            "output_vocab": self.output_vocab,
        }


def model_keys(recipe: Recipe) -> list[str]:
    """Keys of the sources in order: 'base' (when the recipe has one), then each model's spec."""
    return ([BASE] if recipe.base is not None else []) + [m.ref.spec for m in recipe.models]


def config_vocab_size(config: dict[str, Any]) -> int | None:
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs):
        return ",".join(archs)
    return str(config.get("model_type", "?"))


def _default_dtype(recipe: Recipe, config: dict[str, Any], specs: dict[str, TensorSpec]) -> str:
    if recipe.dtype:
        return RECIPE_TO_ST[recipe.dtype]
    declared = config.get("torch_dtype") or config.get("dtype")
    if isinstance(declared, str) and declared in RECIPE_TO_ST:
        return RECIPE_TO_ST[declared]
    floats = [s.dtype for s in specs.values() if s.dtype in FLOAT_DTYPES]
    return max(set(floats), key=floats.count) if floats else "F32"


def _pick_tokenizer_source(recipe: Recipe, keys: list[str], vocab: dict[str, int | None]) -> str:
    if recipe.tokenizer and recipe.tokenizer in keys:
        return recipe.tokenizer
    if recipe.tokenizer_source:
        return recipe.tokenizer_source
    sized = [(vocab[k] or 0, k) for k in keys]
    largest = max(v for v, _ in sized)
    candidates = [k for v, k in sized if v == largest]
    # an extended vocabulary usually comes from the language model: prefer it among equals
    by_role = {m.ref.spec: m.role for m in recipe.models}
    for k in candidates:
        if by_role.get(k) == "language" and largest > min(v for v, _ in sized):
            return k
    return candidates[0]


def _check_architectures(keys: list[str], configs: dict[str, dict[str, Any]]) -> None:
    ref_arch = _architecture(configs[keys[0]])
    for k in keys[1:]:
        arch = _architecture(configs[k])
        if arch != ref_arch:
            raise IncompatibleModelsError(f"models differ in architecture: {keys[0]} is {ref_arch}, {k} is {arch}")


def plan_merge(
    specs: dict[str, dict[str, TensorSpec]],
    configs: dict[str, dict[str, Any]],
    recipe: Recipe,
    vocabulary: VocabularyMap | None = None,
) -> MergePlan:
    """Check that the sources can be merged and decide every output tensor.

    `specs` and `configs` are keyed by 'base' and the models' recipe specs; `vocabulary`
    (a recipe's `tokenizer`) aligns the vocabulary tensors to the tokenizer's vocabulary.
    Raises IncompatibleModelsError naming the model, tensor and numbers on any mismatch.
    """
    if recipe.slices is not None:
        return plan_slices(specs, configs, recipe)
    keys = model_keys(recipe)
    reference = keys[0]
    _check_architectures(keys, configs)

    vocab = {k: config_vocab_size(configs[k]) for k in keys}
    ref_names = set(specs[reference])
    for k in keys[1:]:
        missing = sorted(ref_names - set(specs[k]))
        extra = sorted(set(specs[k]) - ref_names)
        if missing:
            raise IncompatibleModelsError(
                f"tensor {missing[0]} is missing from {k} ({len(missing)} missing; "
                "every model must have the same tensors)"
            )
        if extra:
            raise IncompatibleModelsError(
                f"tensor {extra[0]} of {k} is missing from {reference} ({len(extra)} extra; "
                "every model must have the same tensors)"
            )

    tokenizer_source = _pick_tokenizer_source(recipe, keys, vocab)
    out_dtype = _default_dtype(recipe, configs[reference], specs[reference])
    jobs: list[TensorJob] = []
    bytes_to_read = 0
    for name, ref_spec in specs[reference].items():
        all_specs = {k: specs[k][name] for k in keys}
        bytes_to_read += sum(s.nbytes for s in all_specs.values())
        is_float = all(s.dtype in FLOAT_DTYPES for s in all_specs.values())
        if not is_float:
            for k, s in all_specs.items():
                if s != ref_spec:
                    raise IncompatibleModelsError(
                        f"non-float tensor {name} differs: {reference} has {ref_spec.dtype}{list(ref_spec.shape)}, "
                        f"{k} has {s.dtype}{list(s.shape)}"
                    )
            jobs.append(TensorJob(name, ref_spec.shape, ref_spec.dtype, merge=False))
            continue
        shapes = {k: s.shape for k, s in all_specs.items()}
        if vocabulary is not None and name in VOCABULARY_TENSORS:
            tails = {s[1:] for s in shapes.values()}
            if len(tails) > 1 or any(len(s) == 0 or s[0] != vocab[k] for k, s in shapes.items()):
                detail = ", ".join(f"{k} {list(s)}" for k, s in shapes.items())
                raise IncompatibleModelsError(
                    f"tensor {name}: every model's must have vocab_size rows and the same shape past them: {detail}"
                )
            jobs.append(TensorJob(name, (vocabulary.size, *tails.pop()), out_dtype, merge=True, aligned=True))
            continue
        if len(set(shapes.values())) == 1:
            jobs.append(TensorJob(name, ref_spec.shape, out_dtype, merge=True))
            continue
        # Only vocabulary tensors may differ, and only in their rows.
        tails = {s[1:] for s in shapes.values()}
        is_vocab = len(tails) == 1 and all(
            len(s) >= 1 and vocab[k] is not None and s[0] == vocab[k] for k, s in shapes.items()
        )
        if not is_vocab:
            detail = ", ".join(f"{k} {list(s)}" for k, s in shapes.items())
            raise IncompatibleModelsError(f"tensor {name} has different shapes: {detail}")
        shared = min(s[0] for s in shapes.values())
        out_rows = shapes[tokenizer_source][0]
        extra_from = tokenizer_source if out_rows > shared else None
        jobs.append(
            TensorJob(
                name,
                (out_rows, *ref_spec.shape[1:]),
                out_dtype,
                merge=True,
                shared_rows=shared,
                extra_rows_from=extra_from,
            )
        )

    return MergePlan(
        jobs=jobs,
        reference=reference,
        tokenizer_source=recipe.tokenizer if vocabulary is not None and recipe.tokenizer else tokenizer_source,
        out_dtype=out_dtype,
        vocab_rows={k: v for k, v in vocab.items() if v is not None},
        output_vocab=vocabulary.size if vocabulary is not None else vocab.get(tokenizer_source),
        bytes_to_read=bytes_to_read,
        vocabulary=vocabulary,
    )


# mergekit takes these tensors outside the layers from the first slice's sources (the others,
# the final norm and the output head, from the last slice's)
BEFORE_LAYERS = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")


def slice_inputs(recipe: Recipe, index: int) -> list[tuple[str, str, tuple[int, int]]]:
    """(label, model key, layer range) of each input of slice `index`, in the method's order."""
    assert recipe.slices is not None  # only sliced recipes are planned here
    sl = recipe.slices[index]
    refs = ([sl.part.base] if sl.part.base is not None else []) + [m.ref for m in sl.part.models]
    by_key = ([(BASE, recipe.base)] if recipe.base is not None else []) + [(m.ref.spec, m.ref) for m in recipe.models]
    out = []
    for i, (ref, span) in enumerate(zip(refs, sl.ranges, strict=True)):
        key = next(k for k, r in by_key if r.identity == ref.identity or r.spec == ref.spec)
        out.append((BASE if i == 0 and sl.part.base is not None else key, key, span))
    return out


def plan_slices(
    specs: dict[str, dict[str, TensorSpec]], configs: dict[str, dict[str, Any]], recipe: Recipe
) -> MergePlan:
    """The plan of a frankenmerge, as mergekit 0.1.5 lays it out: the slices' layers numbered
    on from 0, layer `start + i` of each source giving output layer `offset + i` (t = i / (n - 1)
    within a slice of n layers, 1 for one layer); embeddings merged from the first slice's
    sources, the other tensors outside the layers from the last slice's (t = 0)."""
    assert recipe.slices is not None  # plan_merge hands only sliced recipes here
    keys = model_keys(recipe)
    reference = keys[0]
    _check_architectures(keys, configs)
    out_dtype = _default_dtype(recipe, configs[reference], specs[reference])
    slices = [slice_inputs(recipe, i) for i in range(len(recipe.slices))]
    jobs: list[TensorJob] = []

    def add(out_name: str, index: int, names: list[str], t: float) -> None:
        inputs = tuple((label, key, name) for (label, key, _), name in zip(slices[index], names, strict=True))
        found = []
        for _, key, name in inputs:
            if name not in specs[key]:
                raise IncompatibleModelsError(f"slices[{index}]: tensor {name} is missing from {key}")
            found.append(specs[key][name])
        first = found[0]
        for (_, key, name), spec in zip(inputs, found, strict=True):
            if spec.shape != first.shape or (spec.dtype in FLOAT_DTYPES) != (first.dtype in FLOAT_DTYPES):
                raise IncompatibleModelsError(
                    f"slices[{index}]: tensor {name} of {key} is {spec.dtype}{list(spec.shape)}, "
                    f"{inputs[0][2]} of {inputs[0][1]} is {first.dtype}{list(first.shape)}"
                )
        merge = first.dtype in FLOAT_DTYPES
        dtype = out_dtype if merge else first.dtype
        jobs.append(TensorJob(out_name, first.shape, dtype, merge, inputs=inputs, slice=index, t=t))

    first_key = slices[0][0][1]
    outside = [n for n in specs[first_key] if layer_of(n) is None]
    for name in outside:
        if BEFORE_LAYERS.search(name):
            add(name, 0, [name] * len(slices[0]), 0.0)
    offset = 0
    for index, inputs in enumerate(slices):
        _, key, (start, end) = inputs[0]
        length = end - start
        for i in range(length):
            names = sorted(n for n in specs[key] if layer_of(n) == start + i)
            if not names:
                raise IncompatibleModelsError(f"slices[{index}]: {key} has no layer {start + i}")
            for name in names:
                sources = [with_layer(name, s + i) for _, _, (s, _) in inputs]
                add(with_layer(name, offset + i), index, sources, i / (length - 1) if length > 1 else 1.0)
        offset += length
    last = len(slices) - 1
    for name in outside:
        if not BEFORE_LAYERS.search(name):
            add(name, last, [name] * len(slices[last]), 0.0)

    vocab = {k: config_vocab_size(configs[k]) for k in keys}
    bytes_to_read = sum(specs[key][name].nbytes for job in jobs for _, key, name in job.inputs or ())
    return MergePlan(
        jobs=jobs,
        reference=reference,
        tokenizer_source=recipe.tokenizer_source or reference,
        out_dtype=out_dtype,
        vocab_rows={k: v for k, v in vocab.items() if v is not None},
        output_vocab=vocab.get(recipe.tokenizer_source or reference),
        bytes_to_read=bytes_to_read,
        layers=offset,
    )
