"""The data stage: read -> quarantine -> normalize -> exact + MinHash-LSH dedup -> mix -> tokenizer -> pack."""
