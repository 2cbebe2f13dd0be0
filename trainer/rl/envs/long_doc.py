"""Long-document environment: find one fact in a document the model can only read through tools, so that
trajectories grow long (4k+ tokens) from the tool results it reads.

    LongDocEnv.make_rows(n, seed) ─> [{"prompt": "What is the code word for the north gate?", "answer": "amber-falcon",
                                       "task": "long_doc", "key": "north gate", "doc_seed": 81723, "fact_depth": 0.62}]
    reset(row)   document = build_document(doc_seed, key, answer, fact_depth, sections, section_words):
                   `sections` sections of ~`section_words` words of seeded filler; the fact sentence
                   ("The code word for the north gate is amber-falcon.") in section int(fact_depth * sections);
                   `distractors` other keys' code words in other sections
               ─> [system: instructions (+ the tool list), user: "The document has N sections ... <question>"]
    tools      read_section(index) -> the section's text;  search(term) -> the sections containing it
                                                            (only with search=True: without it the model must read)
    reward     1.0 when the final <answer> is the code word (case and surrounding space ignored), else 0.0

A row fixes the task (question, answer, document seed, how deep the fact sits); the env args fix the document's
shape, so the same rows serve any `sections` / `section_words` and every episode is reproducible.
"""

from __future__ import annotations

import random

from trainer.rl.envs.tools import ToolEnv, final_answer

KEYS = ("north gate", "east tower", "river vault", "old library", "harbor office", "mill door", "west bridge",
        "stone cellar", "market hall", "signal tower", "garden shed", "chapel crypt")
CODE_ADJECTIVES = ("amber", "cobalt", "silent", "crimson", "hollow", "golden", "frozen", "bitter", "velvet", "rusty",
                   "lunar", "gentle")
CODE_NOUNS = ("falcon", "lantern", "harbor", "thistle", "anvil", "meadow", "compass", "orchid", "glacier", "ember",
              "willow", "quartz")
_SUBJECTS = ("the farmer", "a traveller", "the miller", "an old clerk", "the baker", "a young sailor", "the weaver",
             "the mayor", "a shepherd", "the carpenter", "a merchant", "the ferryman")
_VERBS = ("carried", "counted", "painted", "repaired", "described", "sold", "found", "moved", "cleaned", "measured",
          "ordered", "noticed")
_OBJECTS = ("the grain sacks", "a broken wheel", "the winter stores", "three wooden crates", "the village records",
            "a bundle of rope", "the harbor lamps", "some fresh bread", "the town ledger", "a copper kettle",
            "the long fence", "two bolts of cloth")
_PLACES = ("near the river", "behind the chapel", "at the market", "before sunrise", "along the narrow road",
           "in the cold cellar", "after the storm", "beside the mill", "on the east hill", "during the fair",
           "under the old bridge", "by the harbor wall")


def fact_sentence(key: str, code: str) -> str:
    return f"The code word for the {key} is {code}."


def _filler_section(rng: random.Random, words: int) -> list[str]:
    sentences, count = [], 0
    while count < words:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
        sentences.append(sentence[0].upper() + sentence[1:])
        count += len(sentence.split())
    return sentences


def _code_word(rng: random.Random) -> str:
    return f"{rng.choice(CODE_ADJECTIVES)}-{rng.choice(CODE_NOUNS)}"


def build_document(doc_seed: int, key: str, answer: str, fact_depth: float, sections: int, section_words: int,
                   distractors: int) -> list[str]:
    """The sections' texts: seeded filler, the fact in section int(fact_depth * sections), and up to
    `distractors` other keys' (different) code words in other sections."""
    rng = random.Random(doc_seed)
    texts = [_filler_section(rng, section_words) for _ in range(sections)]
    fact_section = min(int(fact_depth * sections), sections - 1)
    others = [s for s in range(sections) if s != fact_section]
    decoy_keys = rng.sample([k for k in KEYS if k != key], min(distractors, len(others), len(KEYS) - 1))
    placements = [(fact_section, fact_sentence(key, answer))]
    for decoy_key, section in zip(decoy_keys, rng.sample(others, len(decoy_keys))):
        code = _code_word(rng)
        while code == answer:
            code = _code_word(rng)
        placements.append((section, fact_sentence(decoy_key, code)))
    for section, sentence in placements:
        texts[section].insert(rng.randint(0, len(texts[section])), sentence)
    return [" ".join(sentences) for sentences in texts]


class LongDocEnv(ToolEnv):
    """Find a code word in a long document read section by section (env args: sections, section_words,
    distractors, search, timeout_s, tokenizer, system_in_prompt)."""

    instructions = ("Answer the question about the document. You cannot see the document: read it with the tools. "
                    "Give the final answer as <answer>...</answer>.")

    def __init__(self, sections: int = 16, section_words: int = 400, distractors: int = 3, search: bool = False,
                 timeout_s: float = 5.0, tokenizer=None, system_in_prompt: bool | None = False):
        if sections < 1 or section_words < 1 or distractors < 0:
            raise ValueError(f"need sections >= 1, section_words >= 1 and distractors >= 0, got {sections}, "
                             f"{section_words} and {distractors}")
        self.sections, self.section_words, self.distractors = sections, section_words, distractors
        self.document: list[str] | None = None
        tools = [self.read_section] + ([self.search] if search else [])
        super().__init__(tools, timeout_s=timeout_s, tokenizer=tokenizer, system_in_prompt=system_in_prompt)

    @classmethod
    def make_rows(cls, n: int, seed: int) -> list[dict]:
        """n tasks, the same for the same seed: a key, its code word, a document seed and the fact's depth in [0, 1)."""
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            key = rng.choice(KEYS)
            rows.append({"prompt": f"What is the code word for the {key}?", "answer": _code_word(rng),
                         "task": "long_doc", "key": key, "doc_seed": rng.randrange(2**31),
                         "fact_depth": round(rng.random(), 4)})
        return rows

    def reset(self, row: dict) -> list[dict]:
        self.document = build_document(row["doc_seed"], row["key"], row["answer"], row["fact_depth"], self.sections,
                                       self.section_words, self.distractors)
        question = (f"The document has {self.sections} sections, numbered 0 to {self.sections - 1}. "
                    f"{row['prompt']}")
        return [{"role": "system", "content": self.system_prompt()}, {"role": "user", "content": question}]

    def read_section(self, index: int) -> str:
        """Read one section of the document.

        Args:
            index: The section's number, from 0.

        Returns:
            The section's text.
        """
        document = self._document()
        if not 0 <= index < len(document):
            raise ValueError(f"there is no section {index}; the sections are numbered 0 to {len(document) - 1}")
        return f"Section {index}:\n{document[index]}"

    def search(self, term: str) -> str:
        """Find the sections that contain a word or phrase (ignoring case).

        Args:
            term: The word or phrase to look for.

        Returns:
            The numbers of the sections that contain it.
        """
        if not term.strip():
            raise ValueError("the search term is empty")
        found = [str(i) for i, text in enumerate(self._document()) if term.strip().lower() in text.lower()]
        return f"{term!r} appears in sections {', '.join(found)}" if found else f"no section contains {term!r}"

    def _document(self) -> list[str]:
        if self.document is None:
            raise RuntimeError("the episode has not started (reset was not called)")
        return self.document

    def reward(self, messages: list[dict], row: dict) -> float:
        answer = final_answer(messages)
        return float(answer is not None and answer.lower() == str(row["answer"]).strip().lower())
