"""Content words of a query without a model download (GIFT's query tokens).

GIFT's release tags the query with spaCy (``en_core_web_sm``) and keeps POS in {NOUN, PROPN, VERB, ADJ,
ADV, NUM}. Downloading a spaCy model is not possible everywhere, so we use the complementary closed-class
rule: every word that is not a function word (determiner, pronoun, preposition, conjunction, auxiliary or
modal verb, particle, wh-word, negation, interjection) is a content word. Closed classes are finite, so
the list is exhaustive for English function words; open classes (nouns, verbs, adjectives, adverbs,
numbers) are what remains, which is exactly spaCy's content set up to tagging errors.
"""

from __future__ import annotations

import re

FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    a an the this that these those some any each every either neither no all both half several such what
    whatever which whichever whose my your his her its our their mine yours hers ours theirs
    i me you he him she it we us they them myself yourself himself herself itself ourselves yourselves
    themselves one ones someone something anyone anything everyone everything nobody nothing
    about above across after against along amid among around as at before behind below beneath beside
    besides between beyond by despite down during except for from in inside into like near of off on onto
    out outside over past per since than through throughout till to toward towards under underneath until
    up upon via with within without
    and but or nor so yet because although though while whereas if unless whether
    be is am are was were been being have has had having do does did doing done
    can could may might must shall should will would ought
    not n't to there here how when where why who whom
    please yes oh ok okay
    's 're 've 'd 'll 'm
    """.split()
)

WORD_PATTERN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def content_word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the content words of ``text``."""
    return [
        (m.start(), m.end())
        for m in WORD_PATTERN.finditer(text)
        if m.group(0).lower() not in FUNCTION_WORDS
    ]
