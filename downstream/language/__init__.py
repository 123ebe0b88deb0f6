"""The language side of the language tasks (zero-shot, retrieval, report generation): causal LMs
and LoRA on them, CLIP prompt sets, the shared base of the CLIP evaluation tasks and their
embedding cache. Kept out of `downstream/tasks/`, which holds only task modules."""
