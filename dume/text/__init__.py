"""Users' text: reading document files, the tokenizer, token batches."""
