"""The streaming merge engine: one tensor at a time from mmapped shards to streamed shards.

Peak memory is a small multiple of the largest tensor, never a model. Output is atomic:
everything goes to a temporary folder beside the target, renamed into place at the end.
The engine knows nothing of the Hub: it takes local folders (`Source`) with provenance.
Tensors travel as flat numpy arrays; torch is imported only for the reference methods and
the GPU (a CPU ties/slack_ties merge never pays its seconds of import time).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import InputModelError, OutputError
from ..recipe import Recipe
try:  # fused CPU kernels for ties/slack_ties (numba); the reference path works without them
    from .kernels import FAST_PATHS, NonFiniteInput, as_float32, float32_to, kernel_inputs
except ImportError:  # pragma: no cover - numba is a dependency; this only guards odd installs
    FAST_PATHS, NonFiniteInput = {}, ValueError
from .methods import MergeMethod, get_method
from .plan import BASE, ST_TO_RECIPE, MergePlan, Source, TensorJob, TensorSpec, model_keys, plan_merge
from .st_io import ShardedWriter, TensorSource, as_array, torch_dtype

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "spiece.model",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


# device files a CUDA (or ROCm) GPU shows on Linux; without any, torch would find none
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def cuda_available() -> bool:
    """Whether torch sees a GPU. Asking imports torch (seconds), so a machine without any
    GPU device file is answered without it."""
    if not any(os.path.exists(p) for p in GPU_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when a GPU is visible, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise InputModelError("device: cuda was asked for but no GPU is visible (use --device cpu or auto)")
    return device


def check_output_path(out_dir: Path, sources: dict[str, Source], overwrite: bool) -> None:
    out = out_dir.resolve()
    for key, src in sources.items():
        folder = src.path.resolve()
        if out == folder or folder in out.parents:
            raise OutputError(f"output {out_dir.name} lies inside the input folder of {key}; choose another output path")
        if out in folder.parents:
            raise OutputError(f"output {out_dir.name} contains the input folder of {key}; choose another output path")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out_dir} already exists (pass --overwrite to replace it)")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RetentionCounter:
    """Adds up, per non-base model, the entries kept by the trim and kept by the election."""

    def __init__(self, n: int):
        self.total = [0] * n
        self.kept = [0] * n
        self.agreed = [0] * n

    def add(self, numel: int, kept: list[int], agreed: list[int]) -> None:
        for i in range(len(self.kept)):
            self.total[i] += numel
            self.kept[i] += int(kept[i])
            self.agreed[i] += int(agreed[i])

    def for_model(self, i: int) -> dict[str, Any]:
        kept = self.kept[i]
        return {"total": self.total[i], "kept": kept, "agreed": self.agreed[i],
                "fraction": round(self.agreed[i] / kept, 6) if kept else None}


def to_compute(t: torch.Tensor, device: str, name: str, label: str) -> torch.Tensor:
    """float32 on the compute device, refusing NaN/Inf inputs."""
    import torch

    x = t.to(device=device, dtype=torch.float32, non_blocking=True)
    if not torch.isfinite(x).all():
        raise InputModelError(f"{label}: tensor {name} contains NaN or Inf")
    return x


def merge_tensor(job: TensorJob, method: MergeMethod, readers: dict[str, TensorSource],
                 keys: list[str], model_params: list[dict[str, Any]], params: dict[str, Any],
                 device: str, retention: RetentionCounter | None) -> np.ndarray:
    """Merge one tensor in float32 and return it flat in the output dtype (bfloat16 as its
    bits): the rows every model shares are merged, extra vocabulary rows are copied."""
    row = math.prod(job.out_shape[1:])
    shared = job.shared_rows * row if job.shared_rows is not None else None  # entries merged
    labels = [BASE] + [k for k in keys if k != BASE]
    fast = FAST_PATHS.get(method.name) if device == "cpu" and BASE in keys else None
    kept = agreed = None
    if fast is not None:  # fused kernels reading the mapped inputs in place (kernels.py)
        inputs = kernel_inputs([readers[k].array(job.name)[:shared] for k in labels],
                                     [readers[k].tensors[job.name].spec.dtype for k in labels])
        try:
            merged, kept, agreed = fast(inputs[0], inputs[1:], model_params, params,
                                        out_bf16=job.out_dtype == "BF16", check_finite=True)
        except NonFiniteInput as e:
            raise InputModelError(f"{labels[e.which + 1]}: tensor {job.name} contains NaN or Inf") from None
        if job.out_dtype not in ("BF16", "F32"):
            merged = float32_to(merged, job.out_dtype)
    else:
        raw = {k: readers[k].get(job.name) for k in keys}
        sliced = {k: (t[:job.shared_rows] if job.shared_rows is not None else t) for k, t in raw.items()}
        base = to_compute(sliced[BASE], device, job.name, BASE) if BASE in sliced else None
        models = [to_compute(sliced[k], device, job.name, k) for k in keys if k != BASE]
        result, stats = method.fn(base, models, model_params, params)
        if stats is not None:
            kept, agreed = stats.kept.tolist(), stats.agreed.tolist()
        merged = as_array(result.to(torch_dtype(job.out_dtype)))
    if retention is not None and kept is not None:
        retention.add(merged.size, kept, agreed)
    if job.extra_rows_from is not None:
        src = readers[job.extra_rows_from]
        extra, dtype = src.array(job.name)[shared:], src.tensors[job.name].spec.dtype
        values = extra if dtype == "F32" else as_float32(extra, dtype == "BF16")
        if not np.isfinite(values).all():
            raise InputModelError(f"{job.extra_rows_from}: tensor {job.name} contains NaN or Inf")
        merged = np.concatenate([merged, extra if dtype == job.out_dtype else float32_to(values, job.out_dtype)])
    return merged


def copy_side_files(plan: MergePlan, recipe: Recipe, readers: dict[str, TensorSource], tmp: Path) -> None:
    """config.json from the reference model (vocab and dtype updated), generation config and
    chat template from the task model when it has them, tokenizer from the tokenizer source."""
    config = dict(readers[plan.reference].config)
    if plan.output_vocab is not None and "vocab_size" in config:
        config["vocab_size"] = plan.output_vocab
    dtype = ST_TO_RECIPE.get(plan.out_dtype, "float32")
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    task_keys = [m.ref.spec for m in recipe.models if m.role == "task"]
    prefer = task_keys + [plan.reference] + [k for k in readers if k not in task_keys]

    def first_with(name: str) -> Path | None:
        for k in prefer:
            p = readers[k].folder / name
            if p.is_file():
                return p
        return None

    gen = first_with("generation_config.json")
    if gen:
        shutil.copyfile(gen, tmp / gen.name)
    tok_dir = readers[plan.tokenizer_source].folder
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, tmp / name)
    for name in CHAT_TEMPLATE_FILES:
        p = first_with(name)
        if p:
            shutil.copyfile(p, tmp / name)
    # A chat template kept inside tokenizer_config.json travels with the task model's tokenizer.
    tok_cfg_path = tmp / "tokenizer_config.json"
    if tok_cfg_path.exists() and not any((tmp / n).exists() for n in CHAT_TEMPLATE_FILES):
        for k in prefer:
            cfg_file = readers[k].folder / "tokenizer_config.json"
            if cfg_file.is_file():
                template = json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
                if template:
                    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
                    tok_cfg["chat_template"] = template
                    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
                    break


def open_sources(recipe: Recipe, sources: dict[str, Source]) -> dict[str, TensorSource]:
    readers: dict[str, TensorSource] = {}
    try:
        for key in model_keys(recipe):
            if key not in sources:
                raise InputModelError(f"{key}: no local folder for this model (pull it first)")
            readers[key] = sources[key].open(key)
    except BaseException:
        for r in readers.values():
            r.close()
        raise
    return readers


def build_plan(recipe: Recipe, readers: dict[str, TensorSource]) -> MergePlan:
    keys = model_keys(recipe)
    return plan_merge({k: readers[k].specs for k in keys}, {k: readers[k].config for k in keys}, recipe)


@dataclass
class Output:
    """One model the loop writes: its recipe (a sweep point's), method, folder and writer."""

    recipe: Recipe
    out_dir: Path
    method: MergeMethod
    tmp: Path
    writer: ShardedWriter
    retention: RetentionCounter | None

    def merged(self, job: TensorJob, readers: dict[str, TensorSource], plan: MergePlan, keys: list[str],
               device: str) -> np.ndarray:
        if not job.merge:
            return readers[plan.reference].array(job.name)
        return merge_tensor(job, self.method, readers, keys, [m.params for m in self.recipe.models],
                            self.recipe.parameters, device, self.retention)


def write_all(outputs: list[Output], name: str, arrays: list[np.ndarray]) -> None:
    for o, array in zip(outputs, arrays):
        o.writer.write(name, array)


def merge(recipe: Recipe, sources: dict[str, Source], out_dir: Path, **options: Any) -> dict[str, Any]:
    """Merge the recipe's models into `out_dir` and return the merge report (see merge_many)."""
    return merge_many([(recipe, out_dir)], sources, **options)[0]


def merge_many(
    targets: list[tuple[Recipe, Path]],
    sources: dict[str, Source],
    *,
    device: str = "auto",
    shard_size: int = 5 * 1000**3,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    on_tensor: Callable[[str], None] | None = None,
    on_shard: Callable[[Path], bool] | None = None,
) -> list[dict[str, Any]]:
    """Merge each (recipe, folder) target and return their merge reports. The recipes name
    the same models (a sweep's points differ in parameters only): the loop reads each input
    tensor once and merges it for every target.

    `sources` maps 'base' and each model's recipe spec to a local folder with provenance.
    With dry_run, every input is checked and the plan returned; nothing is written.
    `on_tensor` is called after each tensor is written (tests inject failures with it).
    `on_shard` gets each finished output shard (hub.ShardUploader uploads it; True: it
    removed the file, which the output folder then lacks).
    """
    started = time.perf_counter()
    targets = [(recipe, Path(out_dir).absolute()) for recipe, out_dir in targets]
    recipe = targets[0][0]
    for _, out_dir in targets:
        check_output_path(out_dir, sources, overwrite)
    readers = open_sources(recipe, sources)
    plan = build_plan(recipe, readers)
    keys = model_keys(recipe)
    if any(model_keys(r) != keys or build_plan(r, readers) != plan for r, _ in targets[1:]):
        for r in readers.values():
            r.close()
        raise InputModelError("recipes merged in one pass must name the same models and plan the same output")
    if dry_run:
        return [{"dry_run": True, "method": r.method, "output": str(o), **plan.summary()} for r, o in targets]

    dev = resolve_device(device)
    specs = [(j.name, TensorSpec(j.out_dtype, j.out_shape)) for j in plan.jobs]
    outputs: list[Output] = []
    # Each tensor is written by a background thread while the next one is read and merged
    # (the write releases the GIL, the kernels too); one write in flight at a time, so at
    # most two output tensors per target are held.
    pool = ThreadPoolExecutor(1, thread_name_prefix="lrmerge-write")
    pending: Future | None = None
    try:
        for r, out_dir in targets:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_dir.parent / f".{out_dir.name}.lrmerge-tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            method = get_method(r.method)
            outputs.append(Output(r, out_dir, method, tmp, ShardedWriter(tmp, specs, shard_size, on_shard),
                                  RetentionCounter(len(r.models)) if method.reports_retention else None))
        with tqdm(total=plan.bytes_to_read, unit="B", unit_scale=True, desc="merging",
                  disable=not progress, leave=False) as bar:
            # a copied (non-float) tensor is read from the reference model only
            read_by = [keys if job.merge else [plan.reference] for job in plan.jobs]
            for k in keys:  # each source reads ahead in this order (st_io.TensorSource)
                readers[k].read_order([job.name for job, by in zip(plan.jobs, read_by) if k in by])
            for index, job in enumerate(plan.jobs):
                for k in read_by[index]:
                    readers[k].populate(job.name)
                out = [o.merged(job, readers, plan, keys, dev) for o in outputs]
                if pending is not None:
                    pending.result()
                pending = pool.submit(write_all, outputs, job.name, out)
                del out
                for k in keys:  # its input pages leave our resident set (st_io.release)
                    readers[k].release(job.name)
                bar.update(sum(readers[k].tensors[job.name].spec.nbytes for k in keys))
                bar.set_postfix_str(f"{job.name} | {sum(r.network_bytes for r in readers.values()) / 1e6:.0f} MB "
                                    f"from the Hub | {sum(o.writer.bytes_written for o in outputs) / 1e6:.0f} MB "
                                    "written", refresh=False)
                if on_tensor:
                    on_tensor(job.name)
        if pending is not None:
            pending.result()
            pending = None
        for r in readers.values():  # e.g. each streamed shard's sha256, before the last output shard is handed on
            r.finish()
        reports = []
        for o in outputs:
            o.writer.close()
            copy_side_files(plan, o.recipe, readers, o.tmp)
            report = build_report(o.recipe, sources, plan, o.retention, dev, started, o.writer,
                                  sum(r.network_bytes for r in readers.values()))
            (o.tmp / "recipe.yaml").write_text(o.recipe.to_yaml(), encoding="utf-8")
            (o.tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            reports.append(report)
        for o in outputs:
            install_atomically(o.tmp, o.out_dir)
    except BaseException:
        if pending is not None:
            wait([pending])  # never abort the writer under a write in flight
        for o in outputs:
            o.writer.abort()
            shutil.rmtree(o.tmp, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True)
        for r in readers.values():
            r.close()
    return reports


def install_atomically(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an existing output is replaced only then."""
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.lrmerge-old-{os.getpid()}"
        out_dir.rename(trash)
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def build_report(recipe: Recipe, sources: dict[str, Source], plan: MergePlan,
                 retention: RetentionCounter | None, device: str, started: float,
                 writer: ShardedWriter, bytes_from_network: int) -> dict[str, Any]:
    def source_entry(key: str, display: str) -> dict[str, Any]:
        src = sources[key]
        return {"model": display, "repo_id": src.repo_id, "revision": src.revision}

    models = []
    for i, m in enumerate(recipe.models):
        entry = source_entry(m.ref.spec, m.ref.spec if not m.ref.is_local else m.ref.display)
        entry.update({"hub_id": m.hub_id, "role": m.role, "params": dict(m.params),
                      "retention": retention.for_model(i) if retention else None})
        models.append(entry)
    display = {BASE: recipe.base.display if recipe.base else None}
    display.update({m.ref.spec: (m.ref.spec if not m.ref.is_local else m.ref.display) for m in recipe.models})
    return {
        "tool": {"name": "lrmerge-hub", "version": __version__},
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "recipe_sha256": recipe.sha256(),
        "method": recipe.method,
        "parameters": dict(recipe.parameters),
        "dtype": ST_TO_RECIPE.get(plan.out_dtype, plan.out_dtype),
        "languages": list(recipe.languages),
        "license": recipe.license,
        "base": source_entry(BASE, display[BASE]) if recipe.base else None,
        "models": models,
        "tokenizer_source": display.get(plan.tokenizer_source, plan.tokenizer_source),
        "vocab": {"base_rows": plan.vocab_rows.get(plan.reference), "output_rows": plan.output_vocab},
        "stats": {
            "tensors": len(plan.jobs),
            "parameters": plan.parameters,
            "bytes_read": plan.bytes_to_read,
            "bytes_from_network": bytes_from_network,  # streamed Hub inputs, headers and gaps included
            "bytes_written": writer.bytes_written,
            "peak_disk_bytes": writer.peak_on_disk,  # of weights: shards uploaded and removed no longer count
            "seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "device": device,
        },
    }


def local_sources(recipe: Recipe) -> dict[str, Source]:
    """Sources for a recipe whose models are all local folders (no Hub access)."""
    sources = {}
    refs = ([(BASE, recipe.base)] if recipe.base else []) + [(m.ref.spec, m.ref) for m in recipe.models]
    for key, ref in refs:
        if not ref.is_local:
            raise InputModelError(f"{ref.spec}: a Hub id; pull it first or use a local folder")
        sources[key] = Source(path=ref.path)
    return sources
