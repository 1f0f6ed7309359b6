"""A seeded miniature world and two synthetic languages over it (no download).

The world: people with five facts each (where they live, where they were born, where they
work, their friend, their pet's name); every answer is a proper name, written the same in
both languages (as names mostly are). "English" is SVO with its own function words; the
low-resource language ("LR") is SOV with postpositions, question words in place and a final
question particle, and a lexicon of its own made of CV syllables. The second design's LR
("svo") keeps English's word order and translates word for word into a disjoint lexicon.

Everything here is pure: a seed gives the same world, texts and tokenizers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

RELATIONS = ("lives_in", "born_in", "works_at", "friend", "pet")
OBJECT_KIND = {"lives_in": "city", "born_in": "city", "works_at": "company", "friend": "person", "pet": "pet"}

# English: statement and question per relation ({s} subject, {o} object).
ENGLISH = {
    "lives_in": ("{s} lives in {o} .", "where does {s} live ?"),
    "born_in": ("{s} was born in {o} .", "where was {s} born ?"),
    "works_at": ("{s} works at {o} .", "where does {s} work ?"),
    "friend": ("{s} 's friend is {o} .", "who is {s} 's friend ?"),
    "pet": ("{s} 's pet is called {o} .", "what is {s} 's pet called ?"),
}
# LR: SOV, postpositions (IN, AT), genitive GEN, question word in place, particle Q.
LR_TEMPLATES = {
    "lives_in": ("{s} {o} IN LIVE .", "{s} WHERE LIVE Q ?"),
    "born_in": ("{s} {o} IN BORN .", "{s} WHERE BORN Q ?"),
    "works_at": ("{s} {o} AT WORK .", "{s} WHERE WORK Q ?"),
    "friend": ("{s} GEN FRIEND {o} IS .", "{s} GEN FRIEND WHO IS Q ?"),
    "pet": ("{s} GEN PET {o} CALLED .", "{s} GEN PET WHAT CALLED Q ?"),
}
LR_FUNCTION_WORDS = (
    "IN",
    "AT",
    "LIVE",
    "BORN",
    "WORK",
    "GEN",
    "FRIEND",
    "IS",
    "PET",
    "CALLED",
    "WHERE",
    "WHO",
    "WHAT",
    "Q",
)
# The same-order LR ("svo"): every English word of the sentences has its own LR word.
SVO_WORDS = tuple(sorted({w for pair in ENGLISH.values() for t in pair for w in t.split()} - {"{s}", "{o}", ".", "?"}))
ORDERS = ("sov", "svo")
# The instruction format (English, as in the paper's FLAN-style prompts) and the marker
# every document starts with (the tokenizer's BOS).
QUESTION, ANSWER, BOS, EOS = "Question :", "Answer :", "<s>", "</s>"
SPECIAL = ["<unk>", BOS, EOS]
PUNCT = [".", "?", ":", "'s"]

LR_CONSONANTS, LR_VOWELS = "ptkmnslrbdgvz", "aeiou"
NAME_ONSETS = ["B", "D", "F", "G", "H", "J", "K", "L", "M", "N", "P", "R", "S", "T", "V", "W", "Z"]
NAME_RIMES = ["ar", "en", "il", "on", "ur", "ax", "ek", "im", "os", "ul", "ay", "et"]


@dataclass(frozen=True)
class World:
    names: dict[str, list[str]]  # kind -> proper names
    facts: dict[tuple[str, str], str]  # (person, relation) -> object name
    lexicon: dict[str, str]  # LR function word (IN, LIVE, ...; "svo": the English word) -> LR word
    order: str = "sov"  # the LR's word order: "sov" (the first design's) or "svo" (English's)

    @property
    def people(self) -> list[str]:
        return self.names["person"]

    @property
    def all_names(self) -> list[str]:
        return sorted({n for ns in self.names.values() for n in ns})


@dataclass(frozen=True)
class Item:
    """A passage (facts) and one question about a fact in it."""

    facts: tuple[tuple[str, str], ...]  # (person, relation), in passage order
    query: tuple[str, str]


def make_world(
    seed: int, *, order: str = "sov", people: int = 24, cities: int = 8, companies: int = 6, pets: int = 8
) -> World:
    """The names and facts depend on the seed only; the LR lexicon on the seed and `order`."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    function_words = LR_FUNCTION_WORDS if order == "sov" else SVO_WORDS
    rng = random.Random(seed)
    pool = [o + r for o in NAME_ONSETS for r in NAME_RIMES]
    pool += [o + r + "o" for o in NAME_ONSETS for r in NAME_RIMES]
    rng.shuffle(pool)
    sizes = {"person": people, "city": cities, "company": companies, "pet": pets}
    names, i = {}, 0
    for kind, n in sizes.items():
        names[kind] = pool[i : i + n]
        i += n
    facts = {}
    for p in names["person"]:
        for rel in RELATIONS:
            choices = [o for o in names[OBJECT_KIND[rel]] if o != p]
            facts[(p, rel)] = rng.choice(choices)
    syllables = [c + v for c in LR_CONSONANTS for v in LR_VOWELS]
    words: set[str] = set()
    while len(words) < len(function_words):
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((2, 2, 3)))))
    ordered = sorted(words)  # a set's order changes with the process's hash seed
    rng.shuffle(ordered)
    lexicon = dict(zip(function_words, ordered, strict=True))
    return World(names=names, facts=facts, lexicon=lexicon, order=order)


def statement(world: World, fact: tuple[str, str], lang: str) -> str:
    s, rel = fact
    return _render(world, lang, 0, rel, s=s, o=world.facts[fact])


def question(world: World, fact: tuple[str, str], lang: str) -> str:
    return _render(world, lang, 1, fact[1], s=fact[0])


def _render(world: World, lang: str, which: int, rel: str, **slots: str) -> str:
    if lang == "en":
        return ENGLISH[rel][which].format(**slots)
    if world.order == "svo":  # word for word; names and punctuation are not in the lexicon
        return " ".join(world.lexicon.get(w, w) for w in ENGLISH[rel][which].format(**slots).split())
    words = LR_TEMPLATES[rel][which].format(**slots).split()
    return " ".join(world.lexicon.get(w, w) for w in words)


def sample_item(world: World, rng: random.Random) -> Item:
    """2-3 people, 1-3 facts each, shuffled; the question asks about one of them."""
    subjects = rng.sample(world.people, rng.choice((2, 3)))
    facts = [(s, rel) for s in subjects for rel in rng.sample(RELATIONS, rng.choice((1, 2, 3)))]
    rng.shuffle(facts)
    return Item(facts=tuple(facts), query=rng.choice(facts))


def passage(world: World, item: Item, lang: str) -> str:
    return " ".join(statement(world, f, lang) for f in item.facts)


def corpus_document(world: World, item: Item, lang: str, with_dialogue: bool) -> str:
    """Plain text: the passage, sometimes followed by a question and its answer written as
    a full sentence (natural text has questions, not the instruction format)."""
    text = passage(world, item, lang)
    if with_dialogue:
        text += " " + question(world, item.query, lang) + " " + statement(world, item.query, lang)
    return text


def parallel_document(world: World, item: Item, with_dialogue: bool) -> str:
    """A corpus document written twice, sentence by sentence: each English sentence followed
    by the same sentence in LR."""
    sentences = [(statement, f) for f in item.facts]
    if with_dialogue:
        sentences += [(question, item.query), (statement, item.query)]
    return " ".join(f"{fn(world, f, 'en')} {fn(world, f, 'lr')}" for fn, f in sentences)


def prompt(world: World, item: Item, lang: str) -> str:
    """The instruction format: English markers, content in `lang`; the answer follows."""
    return f"{BOS} {passage(world, item, lang)} {QUESTION} {question(world, item.query, lang)} {ANSWER}"


def answer(world: World, item: Item) -> str:
    return world.facts[item.query]


def chance(world: World, item: Item) -> float:
    """Accuracy of answering with a name drawn uniformly from the passage's names."""
    names = {n for f in item.facts for n in (f[0], world.facts[f])}
    return 1.0 / len(names)


def corpus(world: World, rng: random.Random, lang: str, n: int) -> list[str]:
    """n documents in "en", "lr", or "parallel" (both, sentence by sentence)."""
    if lang == "parallel":
        return [parallel_document(world, sample_item(world, rng), rng.random() < 0.5) for _ in range(n)]
    return [corpus_document(world, sample_item(world, rng), lang, rng.random() < 0.5) for _ in range(n)]


def items(world: World, rng: random.Random, n: int) -> list[Item]:
    return [sample_item(world, rng) for _ in range(n)]


# --- tokenizers -----------------------------------------------------------------------------


def english_words() -> list[str]:
    words = {w for pair in ENGLISH.values() for t in pair for w in t.split()}
    words |= set(QUESTION.split()) | set(ANSWER.split())
    return sorted(w for w in words if "{" not in w)


def lr_words(world: World) -> list[str]:
    return sorted(set(world.lexicon.values()))


def base_vocab(world: World) -> list[str]:
    """English words, names, punctuation and the LR syllables as word pieces: the base
    reads LR text only piece by piece, like a large tokenizer reads Tibetan."""
    syllables = [c + v for c in LR_CONSONANTS for v in LR_VOWELS]
    pieces = syllables + ["##" + s for s in syllables]
    out = list(SPECIAL)
    for w in PUNCT + english_words() + world.all_names + pieces:
        if w not in out:
            out.append(w)
    return out


def save_tokenizer(vocab: list[str], out_dir: Path) -> int:
    """A WordPiece tokenizer over `vocab` (ids in list order), saved for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(
        models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="<unk>", max_input_chars_per_word=100)
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token="<unk>", pad_token=EOS)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return len(fast)
