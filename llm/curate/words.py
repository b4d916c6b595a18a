"""The word tokenizer every curation step uses: a regular expression, offline and the same everywhere.

datatrove's English tokenizer is spaCy's (NLTK's for some steps), an extra dependency with data
of its own. Words here are runs of letters, digits and underscores, and every other visible
character is a word of its own (`x+=1` is `x`, `+`, `=`, `1`), which suits source code as well as
prose; sentences are split as datatrove's fallback tokenizer splits them (terminal punctuation).
"""

import re

from datatrove.utils.word_tokenizers import WhitespaceTokenizer

WORD = re.compile(r"\w+|[^\w\s]")


class RegexWordTokenizer(WhitespaceTokenizer):
    """datatrove's WordTokenizer interface: words by WORD, sentences by terminal punctuation."""

    def word_tokenize(self, text: str) -> list[str]:
        return WORD.findall(text)
