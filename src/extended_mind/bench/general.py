"""Tasks where memory must stay out of the way or keep documents apart.

- `general`: questions a model knows without any document (capitals, planets, authors), asked with a long memory
  of unrelated Wikipedia prose loaded (every sentence naming an answer is left out). A memory that helps where it
  holds the answer must not change answers it does not hold; the report gives how many of the questions answered
  right with no memory stay right.
- `pair`: two to ten short fictional profiles of the same shape (a keeper, a town, a year, a pet) in one memory, one
  question about one profile; the score is 1 when the answer holds that profile's fact and none of another
  profile's, so answers that mix documents score 0 (`meta.mixed` records it).
"""

from __future__ import annotations

import random
import re

from extended_mind.bench.items import Item, mentions

# (question, answer prefix, accepted answers): facts a small instruct model knows.
QUESTIONS: list[tuple[str, str, list[str]]] = [
    ("What is the capital of Italy?", "The capital of Italy is", ["Rome"]),
    ("What is the capital of France?", "The capital of France is", ["Paris"]),
    ("What is the capital of Japan?", "The capital of Japan is", ["Tokyo"]),
    ("What is the capital of Germany?", "The capital of Germany is", ["Berlin"]),
    ("What is the capital of Spain?", "The capital of Spain is", ["Madrid"]),
    ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is", ["London"]),
    ("What is the capital of Russia?", "The capital of Russia is", ["Moscow"]),
    ("What is the capital of China?", "The capital of China is", ["Beijing"]),
    ("What is the capital of Egypt?", "The capital of Egypt is", ["Cairo"]),
    ("What is the capital of Canada?", "The capital of Canada is", ["Ottawa"]),
    ("What is the capital of Australia?", "The capital of Australia is", ["Canberra"]),
    ("What is the largest planet in the solar system?", "The largest planet in the solar system is", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", "The Red Planet is", ["Mars"]),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by", ["Shakespeare"]),
    ("What is the chemical formula of water?", "The chemical formula of water is", ["H2O", "H₂O"]),
    ("How many days are in a week?", "A week has", ["seven", "7"]),
    ("At what temperature does water boil in Celsius?", "Water boils at", ["100"]),
    ("What color is the sky on a clear day?", "On a clear day the sky is", ["blue"]),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the", ["Pacific"]),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by", ["Leonardo", "da Vinci"]),
    ("What gas do plants absorb from the air?", "Plants absorb", ["carbon dioxide", "CO2"]),
    ("How many legs does a spider have?", "A spider has", ["eight", "8"]),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is", ["Everest"]),
    ("What is the longest river in Africa?", "The longest river in Africa is the", ["Nile"]),
    ("What language is spoken in Brazil?", "The language spoken in Brazil is", ["Portuguese"]),
    ("How many continents are there?", "There are", ["seven", "7"]),
    ("Which animal is known as the king of the jungle?", "The king of the jungle is the", ["lion"]),
    ("Who was the first president of the United States?", "The first president of the United States was",
     ["Washington"]),
    ("What do bees make?", "Bees make", ["honey"]),
    ("What is the fastest land animal?", "The fastest land animal is the", ["cheetah"]),
    ("What is the hardest natural substance?", "The hardest natural substance is", ["diamond"]),
    ("Which organ pumps blood through the body?", "The organ that pumps blood through the body is the", ["heart"]),
    ("What is the currency of the United States?", "The currency of the United States is the", ["dollar"]),
    ("Who discovered penicillin?", "Penicillin was discovered by", ["Fleming"]),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at", ["32"]),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in", ["Egypt"]),
    ("What is the largest mammal?", "The largest mammal is the", ["blue whale"]),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by", ["Einstein"]),
    ("How many hours are in a day?", "A day has", ["24", "twenty-four"]),
    ("What is the opposite of hot?", "The opposite of hot is", ["cold"]),
]


def _first_unrelated(pieces: list[str], length: int, cost, avoid: list[str]) -> list[str]:
    """The first `pieces` that mention no word of `avoid`, until their `cost` (tokens) reaches `length`."""
    kept, used = [], 0
    for piece in pieces:
        if any(mentions(piece, a) for a in avoid):
            continue
        kept.append(piece)
        used += cost(piece)
        if used >= length:
            break
    return kept


def unrelated_prose(text: str, length: int, count, avoid: list[str]) -> str:
    """About `length` tokens of `text`'s sentences, leaving out every sentence that mentions a word of `avoid`."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return " ".join(_first_unrelated(sentences, length, lambda s: count(" " + s), avoid))


def list_lines(articles) -> list[str]:
    """The list-like lines of Wikipedia articles: references, bibliographies, "see also" and link lists, headings
    (short lines that are not sentences). Every question draws such text, so it is the hardest memory to ignore."""
    lines = (line.strip() for text in articles for line in text.split("\n"))
    return [line for line in lines if line and len(line) < 120 and not line.endswith(".")]


def unrelated_lines(text: str, length: int, count, avoid: list[str]) -> str:
    """About `length` tokens of `text`'s lines, leaving out every line that mentions a word of `avoid`."""
    lines = [line for line in text.split("\n") if line.strip()]
    return "\n".join(_first_unrelated(lines, length, lambda line: count(line + "\n"), avoid))


def general_items(length: int, n: int, prose: str, count, lists: bool = False) -> list[Item]:
    """The first `n` questions (at most all 40), each with the same unrelated memory: sentences of `prose`, or with
    `lists` its lines (list_lines)."""
    chosen = QUESTIONS[:n]
    avoid = sorted({a for _, _, answers in QUESTIONS for a in answers if len(a) > 2})
    document = (unrelated_lines if lists else unrelated_prose)(prose, length, count, avoid)
    task = "general-lists" if lists else "general"
    return [
        Item(task=task, id=f"{task}-{length}-{i}", length=length, document=document, question=q,
             answer_prefix=prefix, answers=answers, scorer="any", max_new_tokens=12)
        for i, (q, prefix, answers) in enumerate(chosen)
    ]  # fmt: skip


_FIRST = ["Ivo", "Ottilie", "Marek", "Signe", "Tomas", "Aurelie", "Bram", "Helka", "Joost", "Liv"]
_LAST = ["Brask", "Branc", "Vell", "Oduya", "Marn", "Castel", "Ruud", "Tallin", "Orsk", "Feyn"]
_PLACES = ["Skerra", "Hald", "Vesk", "Morrow", "Dunmere", "Quill", "Ostra", "Pellin", "Carrow", "Brisk"]
_PETS = ["Pilot", "Juniper", "Biscuit", "Comet", "Mossy", "Anchor", "Pepper", "Rook", "Saffron", "Tansy"]
_ANIMALS = ["cat", "dog", "parrot", "goat", "tortoise"]


def pair_items(documents: int, n: int, rng: random.Random) -> list[Item]:
    """`n` items, each a memory of `documents` lighthouse-keeper profiles and one question about one of them."""
    items = []
    for i in range(n):
        firsts = rng.sample(_FIRST, documents)
        lasts = rng.sample(_LAST, documents)
        places = rng.sample(_PLACES, documents)
        pets = rng.sample(_PETS, documents)
        years = rng.sample(range(1950, 2020), documents)
        profiles = []
        for f, last, place, pet, year in zip(firsts, lasts, places, pets, years):
            animal = rng.choice(_ANIMALS)
            profiles.append(
                f"{f} {last} is the lighthouse keeper of {place} Point. {f} has kept the light there since {year} "
                f"and lives with a {animal} named {pet}. Every evening {f} {last} climbs the tower to trim the lamp."
            )
        asked = rng.randrange(documents)
        kind = rng.choice(["place", "year", "pet"])
        facts = {"place": places, "year": [str(y) for y in years], "pet": pets}[kind]
        name = f"{firsts[asked]} {lasts[asked]}"
        question, prefix = {
            "place": (f"Where is {name} the lighthouse keeper?", f"{name} is the lighthouse keeper of"),
            "year": (f"Since what year has {name} kept the light?", f"{name} has kept the light since"),
            "pet": (f"What is the name of {name}'s pet?", f"The name of {name}'s pet is"),
        }[kind]
        others = [f for j, f in enumerate(facts) if j != asked]
        items.append(Item(
            task="pair", id=f"pair-{documents}-{i}", length=documents, document="\n\n".join(profiles),
            question=question, answer_prefix=prefix, answers=[facts[asked]], scorer="unmixed", max_new_tokens=12,
            meta={"others": others, "kind": kind, "documents": profiles},
        ))  # fmt: skip
    return items
