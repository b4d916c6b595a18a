"""Data curation with datatrove: readers over the data group's corpora, filters (length, Gopher,
C4), decontamination against the project's evaluation sets, exact and MinHash deduplication,
writers the data group reads back, and the counts of what each step removed (`llm-data`)."""
