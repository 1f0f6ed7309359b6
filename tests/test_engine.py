"""The streaming engine end to end on tiny checkpoints: outputs, files, atomicity, reports."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lrmerge_hub.merge.engine import local_sources, merge
from lrmerge_hub.recipe.spec import load_recipe

from test_methods import ref_ties

RECIPE = """
method: {method}
base: ./models/base
models:
  - {{model: ./models/language, role: language, weight: 1.0, density: 0.2}}
  - {{model: ./models/task, role: task, weight: 0.8, density: 0.3{slack}}}
parameters: {{lambda: 0.9, normalize: true}}
languages: [bo]
license: llama2
{dtype}output: ./merged
"""


def recipe_text(method="slack_ties", slack=0.5, dtype=None):
    return RECIPE.format(
        method=method,
        slack=f", slack: {slack}" if method == "slack_ties" else "",
        dtype=f"dtype: {dtype}\n" if dtype else "",
    )


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def run_merge(write_recipe, text, **kwargs):
    recipe = load_recipe(write_recipe(text))
    report = merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False, **kwargs)
    return recipe, report


@pytest.mark.parametrize("dtype,shard_bytes,tie", [("float32", None, False), ("bfloat16", 60_000, True)])
def test_merge_matches_reference_per_tensor(family, write_recipe, dtype, shard_bytes, tie):
    paths = family(dtype=dtype, shard_bytes=shard_bytes, tie_embeddings=tie)
    recipe, report = run_merge(write_recipe, recipe_text(), shard_size=150_000)
    out = load_all(recipe.output)
    srcs = {k: load_all(p) for k, p in paths.items()}
    assert set(out) == set(srcs["base"])
    assert ("lm_head.weight" in out) != tie
    kept_total = [0, 0]
    for name, merged in out.items():
        assert merged.dtype == srcs["base"][name].dtype  # default output dtype: the base's
        f32 = {k: srcs[k][name].float().numpy() for k in srcs}
        expected, kept, _ = ref_ties(
            f32["base"], [f32["language"], f32["task"]], [1.0, 0.8], [0.2, 0.3], [0.0, 0.5], 0.9, True
        )
        expected = torch.from_numpy(expected).to(merged.dtype).float()
        torch.testing.assert_close(
            merged.float(),
            expected,
            rtol=1e-5 if dtype == "float32" else 1e-2,
            atol=1e-6 if dtype == "float32" else 1e-2,
        )
        kept_total = [a + b for a, b in zip(kept_total, kept, strict=True)]
    assert [m["retention"]["kept"] for m in report["models"]] == kept_total
    shards = list(recipe.output.glob("*.safetensors"))
    assert (len(shards) > 1) == (shard_bytes is not None or dtype == "float32")


def test_output_folder_is_complete(family, write_recipe):
    family(extend_language_vocab=8)
    recipe, report = run_merge(write_recipe, recipe_text(dtype="bfloat16"))
    out = recipe.output
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "recipe.yaml",
        "merge_report.json",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 384 + 8 and config["torch_dtype"] == "bfloat16"
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["method"] == "slack_ties" and saved["languages"] == ["bo"]
    assert saved["tokenizer_source"] == "language" and saved["vocab"] == {"base_rows": 384, "output_rows": 392}
    for m in saved["models"]:
        r = m["retention"]
        assert 0 < r["agreed"] <= r["kept"] < r["total"] and r["fraction"] == pytest.approx(
            r["agreed"] / r["kept"], abs=1e-6
        )
    text = (out / "recipe.yaml").read_text() + (out / "merge_report.json").read_text()
    assert str(out.parent) not in text  # no local absolute paths
    assert load_recipe(out / "recipe.yaml").models[1].params == {"weight": 0.8, "density": 0.3, "slack": 0.5}
    assert not list(out.parent.glob(".merged.lrmerge-*"))


def test_extended_vocabulary_rows_copied_from_language_model(family, write_recipe):
    paths = family(extend_language_vocab=8)
    recipe, _ = run_merge(write_recipe, recipe_text())
    out = load_all(recipe.output)
    lang = load_all(paths["language"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (392, 64)
        assert torch.equal(out[name][384:], lang[name][384:])
        assert not torch.equal(out[name][:384], lang[name][:384])  # shared rows are merged


def test_slack_zero_equals_ties_end_to_end(family, write_recipe):
    family()
    r1, _ = run_merge(
        write_recipe,
        recipe_text(method="ties"),
    )
    a = load_all(r1.output)
    r2, _ = run_merge(write_recipe, recipe_text(method="slack_ties", slack=0.0).replace("./merged", "./merged2"))
    b = load_all(r2.output)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failure_mid_merge_leaves_nothing(family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(recipe_text()))
    calls = []

    def boom(name):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False, on_tensor=boom)
    assert not recipe.output.exists()
    assert not list(recipe.output.parent.glob(".merged*"))


def test_existing_output_kept_on_failure_and_replaced_with_overwrite(family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(recipe_text()))
    recipe.output.mkdir()
    (recipe.output / "keep.txt").write_text("old")

    def boom(name):
        raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError):
        merge(
            recipe, local_sources(recipe), recipe.output, device="cpu", progress=False, overwrite=True, on_tensor=boom
        )
    assert (recipe.output / "keep.txt").read_text() == "old"
    merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False, overwrite=True)
    assert not (recipe.output / "keep.txt").exists() and (recipe.output / "merge_report.json").exists()


def test_linear_without_base(family, write_recipe):
    paths = family()
    recipe, report = run_merge(
        write_recipe,
        """
method: linear
models: [{model: ./models/language, weight: 1}, {model: ./models/task, weight: 3}]
output: ./merged
""",
    )
    out = load_all(recipe.output)
    lang, task = load_all(paths["language"]), load_all(paths["task"])
    for k in out:
        torch.testing.assert_close(out[k], (lang[k] + 3 * task[k]) / 4)
    assert report["base"] is None and report["models"][0]["retention"] is None


def test_merged_model_loads_and_generates(family, write_recipe):
    transformers = pytest.importorskip("transformers")
    family(extend_language_vocab=8)
    recipe, _ = run_merge(write_recipe, recipe_text(dtype="bfloat16"))
    model = transformers.AutoModelForCausalLM.from_pretrained(recipe.output)
    tok = transformers.AutoTokenizer.from_pretrained(recipe.output)
    assert len(tok) == model.config.vocab_size == 392
    ids = tok("The quick brown fox", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("assistant:")


def test_cpu_ties_merge_from_the_cli_never_imports_torch(family, write_recipe):
    """Importing torch costs seconds: `lrmerge merge` of a ties recipe on CPU runs on numpy
    and the fused kernels alone (with `--device auto` on a machine without a GPU too)."""
    import subprocess
    import sys

    family(dtype="bfloat16")
    recipe = write_recipe(recipe_text())
    device = "auto" if not engine_gpu_files() else "cpu"
    code = f"""
import sys
from lrmerge_hub.cli import main
try:
    main(["merge", {str(recipe)!r}, "--device", {device!r}, "--format", "quiet"], prog_name="lrmerge")
except SystemExit as e:
    assert not e.code, e.code
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=recipe.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert (recipe.parent / "merged" / "merge_report.json").exists()


def engine_gpu_files() -> bool:
    import os

    from lrmerge_hub.merge.engine import GPU_DEVICE_FILES

    return any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def test_merges_import_torch_with_sleeping_openmp_threads(tmp_path):
    """Inside a merge, torch is imported with OMP_WAIT_POLICY=PASSIVE (its OpenMP threads
    sleep when idle instead of spinning beside the kernels); afterwards the variable is gone,
    so processes started later keep their defaults; a policy the user set is left alone."""
    import os
    import subprocess
    import sys

    probe = (
        "import os\n"
        "from lrmerge_hub.merge.engine import sleeping_openmp_threads\n"
        "with sleeping_openmp_threads():\n"
        "    import torch\n"
        "    inside = os.environ.get('OMP_WAIT_POLICY')\n"
        "print(inside, os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["PASSIVE", "None"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["ACTIVE", "ACTIVE"]
