"""Data: built-in datasets, local files, tokenisation, masking, packing, collate."""
