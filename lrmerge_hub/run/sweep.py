"""`lrmerge sweep`: merge every point of a parameter grid, evaluate each, promote the best.

The paper tunes merge weights on a validation set; this does the same. Grid keys are any
parameter the recipe's method declares (merge/methods.py):
- global parameters: `lambda`, `normalize`, `seed`, `t`, `select_topk`, ...;
- per-model parameters: `weight`, `density`, `epsilon`, `gamma`, ... (every model), `slack`
  (task models: the slack protects them), or `ROLE.PARAM` (e.g. `language.density`) for the
  models of one role. Each point is checked like a recipe (the method's cross-checks too).

Merges are cheap next to evaluation: evaluation is bounded by `limit`. Every point lands in
`<output>.sweep/<point>/`; a sweep run again reuses a point merged earlier from the same
recipe, and its scores when they came from the same evaluation (`scores.json` in the point's
folder). The best is copied to the recipe's output with `sweep.json` (every point's
parameters and scores), which the card shows; an existing output is replaced only with
`overwrite`, once the copy is complete.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import OutputError, RecipeError
from ..merge.methods import get_method
from .pipeline import RunContext, build_unit, merge_verified, push_target, step_card, step_pull, step_push
from ..recipe.spec import ModelEntry, Recipe, check_normalize

SLACK_ROLE_DEFAULT = "task"


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """['slack=0,0.5,1', 'lambda=0.8,1.0'] -> {'slack': [0, 0.5, 1], 'lambda': [0.8, 1.0]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise RecipeError(f"--grid {item!r}: write it as NAME=V1,V2 (e.g. slack=0,0.5,1)")
        if not all(v.strip() for v in values.split(",")):
            raise RecipeError(
                f"--grid {item!r}: an empty value; write NAME=V1,V2 with a value between every "
                "two commas (e.g. slack=0,0.5,1)"
            )
        parsed = [yaml.safe_load(v.strip()) for v in values.split(",")]
        if key in grid:
            raise RecipeError(f"--grid {key}: given twice")
        twice = next((v for i, v in enumerate(parsed) if v in parsed[:i]), None)
        if twice is not None:
            raise RecipeError(f"--grid {key}: the value {twice!r} is given twice; name each value once")
        grid[key] = parsed
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    return "-".join(f"{k.replace('.', '_')}{v}" for k, v in point.items()) or "default"


def apply_point(recipe: Recipe, point: dict[str, Any]) -> Recipe:
    """The recipe with the point's values set; every value checked like the recipe's own."""
    if recipe.slices is not None and point:  # each slice has parameters of its own
        raise RecipeError(f"--grid {next(iter(point))}: a recipe with slices is not swept; write one recipe per point")
    method = get_method(recipe.method)
    parameters = dict(recipe.parameters)
    models = [
        ModelEntry(ref=m.ref, role=m.role, params=dict(m.params), hub_id=m.hub_id, settings=dict(m.settings))
        for m in recipe.models
    ]
    settings = dict(recipe.settings)  # gradients and filters, except where the point sets a value
    for key, value in point.items():
        role, _, name = key.rpartition(".")
        if not role and name in method.global_params:
            problem = method.global_params[name].check(value)
            if problem:
                raise RecipeError(f"--grid {key}: {problem} (got {value!r})")
            parameters[name] = value
            settings.pop(name, None)
            continue
        if name not in method.model_params:
            allowed = sorted(set(method.global_params) | set(method.model_params))
            raise RecipeError(f"--grid {key}: not a parameter of {recipe.method} (allowed: {', '.join(allowed)})")
        problem = method.model_params[name].check(value)
        if problem:
            raise RecipeError(f"--grid {key}: {problem} (got {value!r})")
        targets = [m for m in models if m.role == (role or (SLACK_ROLE_DEFAULT if name == "slack" else m.role))]
        if not targets:
            raise RecipeError(f"--grid {key}: the recipe has no {role or SLACK_ROLE_DEFAULT} model")
        for m in targets:
            m.params[name] = value
            m.settings.pop(name, None)
    label = "--grid " + " ".join(f"{k}={v}" for k, v in point.items())
    check_normalize(recipe.method, models, parameters, f"{label}: ")
    problem = method.recipe_problem(len(models), recipe.base is not None, [m.params for m in models], parameters)
    if problem:
        raise RecipeError(f"{label}: {problem}")
    return replace(recipe, parameters=parameters, models=models, settings=settings)


def mean_score(scores: list[dict[str, Any]], metric: str | None) -> tuple[float | None, str | None]:
    """Mean of the chosen metric over tasks (default: acc, else the first metric reported)."""
    if not scores:
        return None, metric
    chosen = metric or ("acc" if any(s["metric"] == "acc" for s in scores) else scores[0]["metric"])
    values = [s["value"] for s in scores if s["metric"] == chosen]
    return (sum(values) / len(values) if values else None), chosen


def promote(best_dir: Path, output: Path, files: dict[str, str], *, overwrite: bool = False) -> None:
    """Copy the best point, with `files` added (sweep.json), to the output atomically (hard
    links where the filesystem allows). An existing output is replaced only with `overwrite`."""
    from ..merge.engine import install_atomically

    tmp = output.parent / f".{output.name}.lrmerge-promote-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    try:
        shutil.copytree(best_dir, tmp, copy_function=link_or_copy, ignore=shutil.ignore_patterns(SCORES_FILE))
        for rel, text in files.items():
            (tmp / rel).write_text(text, encoding="utf-8")
        install_atomically(tmp, output, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def point_row(
    point: dict[str, Any], report: dict[str, Any], scores: list[dict[str, Any]], metric: str | None
) -> dict[str, Any]:
    value, chosen = mean_score(scores, metric)
    retention = {m["model"]: (m["retention"] or {}).get("fraction") for m in report["models"]}
    return {
        "point": point,
        "name": point_name(point),
        "score": value,
        "metric": chosen,
        "scores": scores,
        "retention": retention,
    }


def rank(rows: list[dict[str, Any]], metric: str | None) -> list[dict[str, Any]]:
    """Best first (ties keep grid order; points without a score last)."""
    ranked = sorted(rows, key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
    if ranked[0]["score"] is None:
        raise RecipeError(f"sweep: no point reported the metric {metric!r}; pick one with --metric")
    return ranked


SCORES_FILE = "scores.json"  # in a point's folder: its scores, and the evaluation they came from


def earlier_scores(folder: Path, evaluation: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The point's scores from an earlier sweep with the same evaluation, else None."""
    path = folder / SCORES_FILE
    try:
        saved = json.loads(path.read_text()) if evaluation is not None and path.is_file() else {}
    except (OSError, ValueError):
        return None
    return saved.get("scores") if isinstance(saved, dict) and saved.get("evaluation") == evaluation else None


def run_sweep(
    recipe: Recipe,
    grid: dict[str, list[Any]],
    *,
    sources: dict,
    output: Path,
    evaluate: Callable[[Path], list[dict[str, Any]]],
    metric: str | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    evaluation: dict[str, Any] | None = None,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Merge every grid point (in one pass: each input tensor is read once for all points) and
    evaluate each; promote the best to `output` (an existing one only with `overwrite`);
    return the table. `evaluation` describes what `evaluate` runs (tasks, limit, ...): a point
    merged and scored earlier with the same one is not evaluated again (None: always evaluate)."""
    from ..merge.engine import check_output_path, merge_many

    points = grid_points(grid)
    variants = [(p, apply_point(recipe, p)) for p in points]  # validate all before any work
    check_output_path(output, sources, overwrite)  # before any work: nothing is replaced without overwrite
    sweep_dir = output.parent / f"{output.name}.sweep"

    def earlier_report(point: dict[str, Any], variant: Recipe) -> dict[str, Any] | None:
        path = sweep_dir / point_name(point) / "merge_report.json"
        report = json.loads(path.read_text()) if path.exists() else {}
        return report if report.get("recipe_sha256") == variant.sha256() else None

    to_merge = [
        (variant, sweep_dir / point_name(point))
        for point, variant in variants
        if earlier_report(point, variant) is None
    ]
    merged = dict(
        zip(
            (folder.name for _, folder in to_merge),
            merge_many(to_merge, sources, device=device, overwrite=True, progress=progress) if to_merge else [],
            strict=True,
        )
    )
    rows = []
    for i, (point, variant) in enumerate(variants, 1):
        name = point_name(point)
        folder = sweep_dir / name
        report = merged.get(name) or earlier_report(point, variant)
        scores = None if name in merged else earlier_scores(folder, evaluation)
        if name not in merged:
            echo(f"{name}: merged earlier" + (", evaluated earlier" if scores is not None else ""))
        if scores is None:
            echo(f"point {i} of {len(variants)}, {name}: evaluating")
            scores = evaluate(folder)
            if evaluation is not None:
                (folder / SCORES_FILE).write_text(
                    json.dumps({"evaluation": evaluation, "scores": scores}, indent=2) + "\n"
                )
        assert report is not None  # to_merge holds every point without an earlier report
        row = point_row(point, report, scores, metric)
        metric = metric or row["metric"]
        rows.append(row)
        echo(f"{name}: {row['metric']}={row['score'] if row['score'] is None else round(row['score'], 4)}")
    ranked = rank(rows, metric)
    table = {"metric": metric, "best": ranked[0]["name"], "points": ranked}
    best = next(v for p, v in variants if point_name(p) == ranked[0]["name"])
    promote(
        sweep_dir / ranked[0]["name"],
        output,
        {"sweep.json": json.dumps(table, indent=2) + "\n", "recipe.yaml": best.to_yaml(seen_from=output)},
        overwrite=overwrite,
    )
    return table


def merged_scores(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in evaluation["scores"] if s.get("role", "merged") == "merged"]


def run_sweep_on(
    executor: Any,
    recipe: Recipe,
    grid: dict[str, list[Any]],
    spec: Any,
    *,
    sources: dict,
    output: Path,
    metric: str | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """run_sweep on a cluster: each point is a task (merge, evaluate, hash its tensors on a
    worker); a point that fails is a row with its error. The best point is merged again here
    and installed at `output` only if its tensors hash to what its worker reported."""
    from .cluster import Unit
    from ..merge.engine import check_output_path

    variants = {point_name(p): (p, apply_point(recipe, p)) for p in grid_points(grid)}
    check_output_path(output, sources, overwrite)  # before any task runs
    units = {
        name: Unit(name, build_unit, (variant, spec), {"device": device}) for name, (_, variant) in variants.items()
    }
    outcomes = {}
    for outcome in executor.run(units):
        outcomes[outcome.key] = outcome
        unit = outcome.result or {}
        error = outcome.error or unit.get("eval_error")
        echo(
            f"{outcome.key}: "
            + (f"failed: {error.splitlines()[0]}" if error else "evaluated")
            + f" (node {outcome.node.get('ip', '?')})"
        )
    rows = []
    for name, (point, _) in variants.items():  # grid order, as run_sweep ranks ties
        outcome = outcomes[name]
        unit = outcome.result or {}
        error = outcome.error or unit.get("eval_error")
        if error:
            row = {
                "point": point,
                "name": name,
                "score": None,
                "metric": metric,
                "scores": [],
                "retention": {},
                "error": error,
            }
        else:
            row = point_row(point, unit["report"], merged_scores(unit["eval"]), metric)
            metric = metric or row["metric"]
        rows.append({**row, "node": outcome.node})
    ranked = rank(rows, metric)
    best = outcomes[ranked[0]["name"]].result
    table = {"metric": metric, "best": ranked[0]["name"], "points": ranked}
    merge_verified(
        variants[ranked[0]["name"]][1],
        sources,
        output,
        best["sha256"],
        device=device,
        progress=progress,
        files={**best["eval_files"], "sweep.json": json.dumps(table, indent=2) + "\n"},
        overwrite=overwrite,
    )
    return table


def sweep_release(
    recipe: Recipe,
    grid_items: list[str] | tuple[str, ...],
    spec,
    *,
    metric: str | None,
    device: str,
    push_repo: str | None = None,
    token: str | None = None,
    progress: bool = True,
    executor: Any = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """`lrmerge sweep`: pull once, merge and evaluate every grid point, promote the best, card it
    (with every point's scores) and push it when a target is given. With a Ray executor the
    points run as tasks and the best is merged again here (run_sweep_on). An existing output
    is replaced only with `overwrite` (refused before any work otherwise)."""
    import dataclasses

    from ..evaluate.lm_eval import evaluate_for_run

    grid = parse_grid(list(grid_items))
    for point in grid_points(grid):
        apply_point(recipe, point)  # every point checked before any work
    if recipe.output is None:
        raise RecipeError("output: the recipe names no output folder; add `output:`")
    output = recipe.output.absolute()
    if os.path.lexists(output) and not overwrite:
        raise OutputError(
            f"output {output} already exists (pass --overwrite to replace it with the best point "
            "once the sweep is complete)"
        )
    ctx = RunContext(recipe=recipe, output=output, device=device, token=token, push_repo=push_repo, progress=progress)
    step_pull(ctx)

    def evaluate(folder: Path) -> list[dict[str, Any]]:
        return merged_scores(evaluate_for_run(folder, recipe, spec, sources=ctx.sources, echo=echo))

    if executor is None:
        table = run_sweep(
            recipe,
            grid,
            sources=ctx.sources,
            output=output,
            evaluate=evaluate,
            metric=metric,
            device=device,
            progress=progress,
            overwrite=overwrite,
            echo=echo,
            evaluation=json.loads(json.dumps(dataclasses.asdict(spec), default=str)),
        )
    else:
        table = run_sweep_on(
            executor,
            recipe,
            grid,
            spec,
            sources=ctx.sources,
            output=output,
            metric=metric,
            device=device,
            progress=progress,
            overwrite=overwrite,
            echo=echo,
        )
    result: dict[str, Any] = {"output": str(output), **table, "card": step_card(ctx)["card"]}
    if push_target(ctx) is not None:
        result["push"] = step_push(ctx)
    lines = [f"{'point':<32} {table['metric']:>10}"]
    for p in table["points"]:
        value = "n/a" if p["score"] is None else f"{p['score']:.4f}"
        lines.append(
            f"{p['name']:<32} {value:>10}"
            + ("  <- best, promoted" if p["name"] == table["best"] else "")
            + (f"  (node {p['node'].get('ip')})" if p.get("node") else "")
            + (f"  error: {p['error'].splitlines()[0]}" if p.get("error") else "")
        )
    result["table_text"] = "\n".join(lines) + f"\noutput: {output}"
    return result
